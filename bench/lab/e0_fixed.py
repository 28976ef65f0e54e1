"""Fixed-rank sweep in the lab, trained on 15 (the suite's reference) and on 12 (the held-out share's cost)."""
import sys, os, json
sys.path.insert(0, os.path.dirname(__file__))
import lab
tasks = sys.argv[1].split(","); seeds = [int(s) for s in sys.argv[2].split(",")]; out = sys.argv[3]
results = json.load(open(out)) if os.path.exists(out) else {}
for t in tasks:
    for s in seeds:
        for held in (False, True):
            for r in (1, 2, 4, 8, 16, 32, 64):
                key = f"{t}|{s}|fixed {r}{' on 12' if held else ''}"
                if key in results:
                    continue
                res = lab.train(lab.make(t, s), s, lab.Run(rank=r, held_out=held))
                results[key] = {"heldout": res["heldout"], "cpu": res["cpu"], "ranks": res["ranks"]}
                print(key, round(res["heldout"], 5), flush=True)
                json.dump(results, open(out, "w"))
