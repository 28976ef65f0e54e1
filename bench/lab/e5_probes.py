import sys, os, json
sys.path.insert(0, os.path.dirname(__file__))
import lab
from probes import Probes
tasks = sys.argv[1].split(","); seeds = [int(s) for s in sys.argv[2].split(",")]
variants = sys.argv[3].split(",")
out = sys.argv[4]
V = {
  "hp-s4-q.5": dict(start=4, q=0.5),
  "hp-s1-q.5": dict(start=1, q=0.5),
  "hp-s4-q.25": dict(start=4, q=0.25),
  "hp-s2-q.5-x1": dict(start=2, q=0.5),
  "hp-s4-q.5-se0": dict(start=4, q=0.5, se=0.0),
  "hp-s4-q.5-stop.7": dict(start=4, q=0.5, stop=0.7),
  "hp-s4-q.5-se2": dict(start=4, q=0.5, se=2.0),
}
results = json.load(open(out)) if os.path.exists(out) else {}
for t in tasks:
    for s in seeds:
        for v in variants:
            held = not v.endswith("-all15")
            p = Probes(**V[v.replace("-all15", "")])
            res = lab.train(lab.make(t, s), s, p.run(held_out=held))
            key = f"{t}|{s}|{v}"
            results[key] = {"heldout": res["heldout"], "cpu": res["cpu"], "ranks": res["ranks"],
                            "log": [(e, ok, ks) for e, ok, ks, _ in res["log"]]}
            print(key, round(res["heldout"], 5), res["ranks"], [(e, int(ok), ks[0]) for e, ok, ks, _ in res["log"]], flush=True)
            json.dump(results, open(out, "w"))
