import sys, os, json
sys.path.insert(0, os.path.dirname(__file__))
import lab
from grow import Parsimony
from loo import loo_judge, direction_judge
tasks = sys.argv[1].split(","); seeds = [int(s) for s in sys.argv[2].split(",")]; out = sys.argv[3]
results = json.load(open(out)) if os.path.exists(out) else {}
for t in tasks:
    for s in seeds:
        p = Parsimony(reset_opt=False, judge=direction_judge() if "dir" in out else loo_judge)
        res = lab.train(lab.make(t, s), s, p.run(held_out=False))
        key = f"{t}|{s}|" + ("dir-oracle" if "dir" in out else "loo-oracle")
        results[key] = {"heldout": res["heldout"], "ranks": res["ranks"], "log": [(e, ks) for e, lv, ks, _ in res["log"]]}
        print(key, round(res["heldout"], 5), res["ranks"], [(e, ks) for e, lv, ks, _ in res["log"]], flush=True)
        print("   last effects", res["log"][-1][3]["effects"] if "effects" in res["log"][-1][3] else "", flush=True)
        json.dump(results, open(out, "w"))
