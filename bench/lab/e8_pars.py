import sys, os, json
sys.path.insert(0, os.path.dirname(__file__))
import lab
from grow import Parsimony
tasks = sys.argv[1].split(","); seeds = [int(s) for s in sys.argv[2].split(",")]
variants = sys.argv[3].split(","); out = sys.argv[4]
V = {
  "pars-first": dict(first_only=True, reset_opt=False),
  "pars-every-reset": dict(),
  "pars-every": dict(reset_opt=False),
  "best-every": dict(rule="best", reset_opt=False),
  "pars-every-se2": dict(se=2.0, reset_opt=False),
  "pars-every-se0.5": dict(se=0.5, reset_opt=False),
  "pars-fold.7": dict(reset_opt=False, fold=0.7),
  "pars-cluster": dict(reset_opt=False, cluster=True),
  "best-fold.7": dict(rule="best", reset_opt=False, fold=0.7),
  "pars-cluster-se.5": dict(reset_opt=False, cluster=True, se=0.5),
  "pars-cluster-se.5-fold.7": dict(reset_opt=False, cluster=True, se=0.5, fold=0.7),
  "pars-cluster-fold.7": dict(reset_opt=False, cluster=True, fold=0.7),
  "pars-cluster-fold.7-reset": dict(reset_opt=False, cluster=True, fold=0.7, fold_reset=True),
  "pars-cluster-fold.5": dict(reset_opt=False, cluster=True, fold=0.5),
  "pars-cluster-fold.8": dict(reset_opt=False, cluster=True, fold=0.8),
  "pars-fold.5": dict(reset_opt=False, fold=0.5),
}
results = json.load(open(out)) if os.path.exists(out) else {}
for t in tasks:
    for s in seeds:
        for v in variants:
            p = Parsimony(**V[v])
            res = lab.train(lab.make(t, s), s, p.run(held_out=True))
            key = f"{t}|{s}|{v}"
            results[key] = {"heldout": res["heldout"], "cpu": res["cpu"], "ranks": res["ranks"],
                            "log": [(e, ks) for e, lv, ks, _ in res["log"]]}
            print(key, round(res["heldout"], 5), res["ranks"], [(e, ks) for e, lv, ks, _ in res["log"]], flush=True)
            json.dump(results, open(out, "w"))
