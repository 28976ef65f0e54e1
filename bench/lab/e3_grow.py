"""E3: growth with held-out acceptance vs the fixed-rank sweep, in the lab."""
import sys, os, json, statistics
sys.path.insert(0, os.path.dirname(__file__))
import lab
from grow import Grow

tasks = sys.argv[1].split(","); seeds = [int(s) for s in sys.argv[2].split(",")]
variants = sys.argv[3].split(",") if len(sys.argv) > 3 else ["sweep", "start4-prev", "start64-all"]
out = sys.argv[4] if len(sys.argv) > 4 else None
VARIANTS = {
    "start4-prev": dict(start=4, ref="prev"),
    "start4-all": dict(start=4, ref="all"),
    "start64-all": dict(start=64, ref="all"),
    "start64-prev": dict(start=64, ref="prev"),
    "start1-prev": dict(start=1, ref="prev"),
    "start4-prev-backoff": dict(start=4, ref="prev", backoff=True),
    "start4-prev-x3": dict(start=4, ref="prev", growth=3.0),
    "start2-prev-x3": dict(start=2, ref="prev", growth=3.0),
    "start4-prev-x3-backoff": dict(start=4, ref="prev", growth=3.0, backoff=True),
}
results = json.load(open(out)) if out and os.path.exists(out) else {}
for t in tasks:
    for s in seeds:
        task_runs = {}
        for v in variants:
            if v == "sweep":
                for r in (1, 2, 4, 8, 16, 32, 64):
                    key = f"{t}|{s}|fixed {r}"
                    if key not in results:
                        res = lab.train(lab.make(t, s), s, lab.Run(rank=r))
                        results[key] = {"heldout": res["heldout"], "cpu": res["cpu"], "ranks": res["ranks"]}
                    print(key, round(results[key]["heldout"], 5), flush=True)
                continue
            key = f"{t}|{s}|{v}"
            grow = Grow(**VARIANTS[v])
            res = lab.train(lab.make(t, s), s, grow.run(held_out=True))
            results[key] = {"heldout": res["heldout"], "cpu": res["cpu"], "ranks": res["ranks"],
                            "log": [(e, lv if lv != float("inf") else None, ks) for e, lv, ks, _ in res["log"]]}
            print(key, round(res["heldout"], 5), res["ranks"], [(e, ks) for e, lv, ks, _ in res["log"]], flush=True)
        if out:
            json.dump(results, open(out, "w"))
