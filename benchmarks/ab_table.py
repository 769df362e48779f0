"""Print old vs new medians of the A/B reports (same call, alternating)."""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])


def load(p):
    try:
        d = json.loads(p.read_text())
    except Exception as e:  # noqa: BLE001
        print(p.name, "unreadable", e)
        return {}
    return {(m["layer"], m["batch"], m["mode"], m["graph"], m["kernel"], m["dtype"]): (m["median_us"], m.get("max_rel_error"))
            for m in d["measurements"]}


runs = {n: load(out / f"{n}.json") for n in ("bench-old-1", "bench-new-1", "bench-old-2", "bench-new-2", "model-old", "model-new")}
keys = sorted(set().union(*[set(r) for r in runs.values()]), key=str)
print(f"{'layer':<18}{'b':>2} {'mode':<5}{'g':>2} {'kernel':<12}{'old1':>9}{'new1':>9}{'old2':>9}{'new2':>9}{'new/old':>8}")
for k in keys:
    if k[4] == "stream" and k[0] == "model":
        continue
    if any(k in runs[n] for n in ("model-old", "model-new")):
        v = [runs["model-old"].get(k, (None,))[0], runs["model-new"].get(k, (None,))[0], None, None]
    else:
        v = [runs[n].get(k, (None,))[0] for n in ("bench-old-1", "bench-new-1", "bench-old-2", "bench-new-2")]
    f = [f"{x:9.2f}" if isinstance(x, (int, float)) and x == x else f"{'-':>9}" for x in v]
    olds = [x for x in (v[0], v[2]) if isinstance(x, (int, float)) and x == x]
    news = [x for x in (v[1], v[3]) if isinstance(x, (int, float)) and x == x]
    ratio = f"{(sum(news) / len(news)) / (sum(olds) / len(olds)):8.3f}" if olds and news else f"{'-':>8}"
    print(f"{str(k[0])[:18]:<18}{k[1]:>2} {k[2]:<5}{int(bool(k[3])):>2} {k[4][:12]:<12}{''.join(f)}{ratio}")
