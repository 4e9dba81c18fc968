"""Print the README tables of benchmarks/reproduce.sh from its run folders.

    python benchmarks/summarize.py runs/repro
    python benchmarks/summarize.py --readings runs/readings     # readings of Eq. (1)-(3), stereo vs mono
    python benchmarks/summarize.py --stereo-probe runs/stereo-probe   # benchmarks/stereo_probe.sh
    python benchmarks/summarize.py --stereo runs/stereo         # stereo vs mono, CAVP vs SupCon
    python benchmarks/summarize.py --avsmss runs/avsmss         # CAVP Sec. 5.2: TPAVI on S4 vs AVS-M-SS

Figures are test-split percentages of the last epoch (metrics.json "final"); "a (b-c)" = mean over
seeds (lowest-highest). Item 5 reads eval-real.json / eval-silence.json / eval-absent.json. --avsmss: test
figures of best.pt (selected on val), mean +- sample standard deviation over the seeds, and two-sided t-tests.
"""
import argparse
import glob
import json
import math
import os
import re
import sys

SUBSETS = ("ss", "ms", "msmi")
NAMES = {"tpavi": "TPAVI (tpavi.py, AVS recipe)", "tpavifusion": "TPAVI-like fusion (cavp.py, no contrast)",
         "cavp": "CAVP (stereo)", "cavp-mono": "CAVP (mono)", "ca": "f_CA, no contrast",
         "supcon": "f_CA + SupCon (uniform)"}


READINGS = {"supcon": "SupCon, uniform (Table 5 row 3)", "cavp": "CAVP, first readings (set, mismatched, label, class, single)",
            "poslabel": "--positives label", "unkliteral": "--unknown literal", "bgone": "--bg-groups one",
            "side": "--match side", "bankall": "--bank-sources all", "cavp-mono": "CAVP, first readings, mono",
            "best": "best combination", "best-mono": "best combination, mono"}


def load(path):
    with open(path) as f:
        return json.load(f)


def runs(root, method, subset):
    """[(seed, run folder)] of the finished runs of one method on one subset."""
    found = []
    for d in sorted(glob.glob(os.path.join(root, f"{method}-{subset}-s*"))):
        m = re.fullmatch(rf"{re.escape(method)}-{subset}-s(\d+)", os.path.basename(d))
        if m and os.path.isfile(os.path.join(d, "metrics.json")) and wall_time(d) is not None:
            found.append((int(m.group(1)), d))
    return found


def wall_time(run):
    with open(os.path.join(run, "log.txt")) as f:
        done = re.findall(r"^done in (\d+) s", f.read(), re.M)
    return int(done[-1]) if done else None


def spread(values, digits=2):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def final(run):
    res = load(os.path.join(run, "metrics.json"))["final"]
    real = os.path.join(run, "eval-real.json")
    if os.path.isfile(real) and abs(load(real)["eval"]["miou"] - res["miou"]) > 1e-6:
        sys.exit(f"{run}: eval-real.json (last.pt) disagrees with metrics.json's final mIoU; rerun the evaluation")
    return res


def scores(root, method, subset):
    """Per-seed lists (in %, null metrics as None) of the finished runs of one method on one subset."""
    rs = runs(root, method, subset)
    res = [final(d) for _, d in rs]
    pct = lambda key: [None if r.get(key) is None else 100 * r[key] for r in res]  # noqa: E731
    return dict(n=len(rs), seeds=[s for s, _ in rs], miou=pct("miou"), fbeta=pct("mean_fbeta"),
                fdr=pct("mean_fdr"), minutes=[wall_time(d) / 60 for _, d in rs],
                **{k: pct(k) for k in TWIN_COLUMNS})


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def metric_rows(root, methods, subsets, names=NAMES):
    rows = []
    for s in subsets:
        for m in methods:
            r = scores(root, m, s)
            if r["n"]:
                rows.append([f"VPO-{s.upper()}", names[m], ",".join(map(str, r["seeds"])), spread(r["miou"]),
                             spread(r["fbeta"]), spread(r["fdr"]), spread(r["minutes"], 1)])
    return table(["data", "method", "seeds", "mIoU", "F-beta", "FDR (lower is better)", "wall min"], rows)


TWIN_COLUMNS = ("twin_recall", "twin_share", "twin_side_acc", "twin_recall_swap", "twin_share_swap",
                "twin_side_acc_swap")


def differences(xs, ys):
    """x - y for each pair of per-seed values where both are known."""
    return [x - y for x, y in zip(xs, ys) if None not in (x, y)]


def paired(root, a, b, subset, key="miou"):
    """Per-seed differences a - b of one metric (default mIoU) over the seeds both have."""
    ma, mb = (dict(zip(r["seeds"], r[key])) for r in (scores(root, a, subset), scores(root, b, subset)))
    both = [s for s in ma if s in mb]
    return differences([ma[s] for s in both], [mb[s] for s in both])


def readings_rows(root, methods, subsets, base, names=READINGS):
    """Table rows with the twin metrics and the seed-paired mIoU difference to `base` on the same subset."""
    rows = []
    for s in subsets:
        for m in methods:
            r = scores(root, m, s)
            if r["n"]:
                rows.append([f"VPO-{s.upper()}", names[m], ",".join(map(str, r["seeds"])), spread(r["miou"]),
                             spread(paired(root, m, base, s)) if m != base else "",
                             spread(r["fbeta"]), spread(r["fdr"])] + [spread(r[k], 1) for k in TWIN_COLUMNS])
    return table(["data", "method", "seeds", "mIoU", f"mIoU - {base} (paired by seed)", "F-beta",
                  "FDR (lower is better)", "twin: sounding recall", "twin: silent-twin share", "twin: side acc",
                  "L/R swapped: recall", "swapped: twin share", "swapped: side acc"], rows)


def readings(root):
    """Single changes of the readings of Eq. (1)-(3) against the baseline CAVP readings and SupCon
    on VPO-MSMI, then the best combination and stereo vs mono on every subset."""
    print("### Readings of Eq. (1)-(3) on VPO-MSMI\n")
    print(readings_rows(root, ("supcon", "cavp", "poslabel", "unkliteral", "bgone", "side", "bankall",
                               "best", "best-mono"), ("msmi",), "cavp"))
    pairs = [(a, b, paired(root, a, b, "msmi")) for a, b in (("best", "supcon"), ("best", "poslabel"),
                                                            ("poslabel", "supcon"))]
    print("\npaired by seed, mIoU: " + "; ".join(f"{a} - {b} {spread(d)}" for a, b, d in pairs if d))
    print("\n### Best combination: stereo vs mono\n")
    print(readings_rows(root, ("best-mono", "best"), SUBSETS, "best-mono"))


PROBE = {"base": "paper: no position code, conv1 mean, pans from the CSV, --match class",
         "pos": "base + --pos-enc sine", "conv1": "base + --audio-conv1 split", "pan": "base + --pan crop",
         "side": "base + --match side", "all": "all four levers", "all-long": "all four levers, LONG_ITERS"}
PROBE_DATA = {"solo": "one sounding twin", "mixed": "twin + other sources"}


def probe_runs(root):
    """{(run, data): {seed: (metrics.json content, finished)}} of the stereo_probe.sh folders written so far."""
    found = {}
    for d in sorted(glob.glob(os.path.join(root, "*-s*"))):
        m = re.fullmatch(rf"({'|'.join(PROBE)})-({'|'.join(PROBE_DATA)})-s(\d+)", os.path.basename(d))
        if m and os.path.isfile(os.path.join(d, "metrics.json")):
            found.setdefault(m.group(1, 2), {})[int(m.group(3))] = (load(os.path.join(d, "metrics.json")),
                                                                    wall_time(d) is not None)
    return dict(sorted(found.items(), key=lambda kv: (list(PROBE_DATA).index(kv[0][1]), list(PROBE).index(kv[0][0]))))


def rate(h, key):
    """An evaluation's rate as a percentage string, '-' where it is missing."""
    return "-" if h is None or h.get(key) is None else f"{100 * h[key]:.1f}"


def stereo_probe(root):
    """Side accuracy (real / L/R-swapped channels) over training for each run folder of
    stereo_probe.sh (one column per seed: a run either learns the side or not, and a mean would
    hide which), then each run's last evaluation (mean over seeds)."""
    found = probe_runs(root)
    if not found:
        sys.exit(f"{root}: no run folder of benchmarks/stereo_probe.sh (<run>-<data>-s<seed>/metrics.json)")
    curves = {(run, data, seed): {h["iteration"]: h for h in res["history"]}
              for (run, data), seeds in found.items() for seed, (res, _) in sorted(seeds.items())}
    print("### Side accuracy over training: real / L/R-swapped channels, % of the twin images\n")
    header = ["iteration"] + [f"{run} ({data}) s{seed}" + ("" if found[run, data][seed][1] else ", running")
                              for run, data, seed in curves]
    rows = []
    for it in sorted({it for c in curves.values() for it in c}):
        real_swap = [(rate(c.get(it), "twin_side_acc"), rate(c.get(it), "twin_side_acc_swap")) for c in curves.values()]
        rows.append([it] + ["-" if real == "-" else f"{real} / {swap}" for real, swap in real_swap])
    print(table(header, rows))
    print("\n### Last evaluation of the finished runs (% ; a (b-c) = mean over seeds (lowest-highest))\n")
    rows = []
    for (run, data), seeds in found.items():
        done = {s: res["final"] for s, (res, fin) in seeds.items() if fin}
        if not done:
            continue
        pct = lambda key: [None if r.get(key) is None else 100 * r[key] for r in done.values()]  # noqa: E731
        gap = differences(pct("twin_side_acc"), pct("twin_side_acc_swap"))
        iters = sorted({seeds[s][0]["history"][-1]["iteration"] for s in done})
        rows.append([PROBE_DATA[data], run, PROBE[run], ",".join(map(str, sorted(done))), ",".join(map(str, iters)),
                     spread(pct("miou")), spread(pct("twin_recall"), 1), spread(pct("twin_share"), 1),
                     spread(pct("twin_side_acc"), 1), spread(pct("twin_side_acc_swap"), 1), spread(gap, 1)])
    print(table(["data", "run", "setting", "seeds", "iterations", "mIoU", "sounding recall", "silent-twin share",
                 "side acc", "side acc, L/R swapped", "side acc: real - swapped"], rows))


STEREO = {"stereo": "CAVP, stereo (--pos-enc sine --pan crop)", "mono": "CAVP, mono (--pos-enc sine --pan crop --mono)",
          "paper": "CAVP, stereo, paper's setting (--pos-enc none --pan csv: the defaults)",
          "paper-mono": "CAVP, mono, paper's setting (--pos-enc none --pan csv --mono)",
          "supcon": "f_CA + SupCon, stereo (--pos-enc sine --pan crop --contrast supcon)"}


def paired_p(diffs):
    """Two-sided p of the one-sample t-test of seed-paired differences against 0 (NaN below 2 seeds)."""
    n = len(diffs)
    if n < 2:
        return math.nan
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if sd == 0:
        return 0.0 if mean else math.nan
    return two_sided_p(mean / (sd / math.sqrt(n)), n - 1)


def paired_note(diffs):
    """'p = 0.249, 3 seeds' for the paired t-test of seed-paired differences; no test on one seed."""
    return f"p = {paired_p(diffs):.3f}, {len(diffs)} seeds" if len(diffs) > 1 else "1 seed: no test"


def stereo(root):
    """Stereo vs mono with this project's defaults and with the paper's setting, and CAVP's mining
    vs SupCon, on VPO-MSMI; seed-paired differences with their range and paired t-test p."""
    print("### Stereo vs mono, CAVP vs SupCon on VPO-MSMI (%; a (b-c) = mean over seeds (lowest-highest))\n")
    print(readings_rows(root, tuple(STEREO), ("msmi",), "mono", STEREO))
    print("\n### Seed-paired differences, mean (lowest-highest) [paired t-test p]\n")
    for a, b, key in (("stereo", "mono", "miou"), ("paper", "paper-mono", "miou"), ("stereo", "paper", "miou"),
                      ("mono", "paper-mono", "miou"), ("stereo", "supcon", "miou"),
                      ("stereo", "mono", "twin_side_acc"), ("paper", "paper-mono", "twin_side_acc")):
        d = paired(root, a, b, "msmi", key)
        if d:
            print(f"- {key}, {a} - {b}: {spread(d)} [{paired_note(d)}]")
    for m in ("stereo", "paper", "supcon"):
        r = scores(root, m, "msmi")
        gap = differences(r["twin_side_acc"], r["twin_side_acc_swap"])
        if gap:
            print(f"- side acc, real - L/R swapped channels, {m}: {spread(gap, 1)} [{paired_note(gap)}]")
    for seed, run in runs(root, "curve", "msmi"):
        print(f"\n### The default stereo model over a longer run (curve-msmi-s{seed}), %\n")
        twins = ("twin_recall", "twin_share", "twin_side_acc", "twin_side_acc_swap")
        rows = [[h["iteration"], f"{100 * h['miou']:.2f}"] + [rate(h, k) for k in twins]
                for h in load(os.path.join(run, "metrics.json"))["history"]]
        print(table(["iteration", "mIoU", "sounding recall", "silent-twin share", "side acc", "side acc, L/R swapped"],
                    rows))


def margin(root, a, b, subset):
    """mean mIoU of a minus mean mIoU of b (seeds that both have), or None."""
    ra, rb = scores(root, a, subset), scores(root, b, subset)
    both = sorted(set(ra["seeds"]) & set(rb["seeds"]))
    if not both:
        return None
    pick = lambda r: [v for s, v in zip(r["seeds"], r["miou"]) if s in both]  # noqa: E731
    return sum(pick(ra)) / len(both) - sum(pick(rb)) / len(both)


def betainc(a, b, x):
    """Regularised incomplete beta function I_x(a, b): the continued fraction of Numerical Recipes (6.4),
    evaluated with the modified Lentz method, on the side of (a + 1) / (a + b + 2) where it converges fast."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1 - betainc(b, a, 1 - x)
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d, c = 1 + num * d, 1 + num / c
            d, c = 1 / (d if abs(d) > tiny else tiny), c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    return front * h / a


def t_test(x, y, welch=False):
    """Two-sided two-sample t-test -> (t, df, p): Student's with the pooled variance, or Welch's with the
    Welch-Satterthwaite df; p = P(|T| >= |t|) = I_{df / (df + t^2)}(df / 2, 1 / 2). Without any spread: t = +-inf
    and p = 0 for different means, NaN for equal ones (Welch's df is then NaN too)."""
    nx, ny = len(x), len(y)
    mx, my = sum(x) / nx, sum(y) / ny
    vx, vy = (sum((v - mx) ** 2 for v in x) / (nx - 1), sum((v - my) ** 2 for v in y) / (ny - 1))
    if welch:
        se2 = vx / nx + vy / ny
        df = se2 ** 2 / ((vx / nx) ** 2 / (nx - 1) + (vy / ny) ** 2 / (ny - 1)) if se2 else math.nan
    else:
        df = nx + ny - 2
        se2 = ((nx - 1) * vx + (ny - 1) * vy) / df * (1 / nx + 1 / ny)
    if se2 == 0:  # no spread in either group: any difference is certain, none is undefined
        return (math.copysign(math.inf, mx - my), df, 0.0) if mx != my else (math.nan, df, math.nan)
    t = (mx - my) / math.sqrt(se2)
    return t, df, two_sided_p(t, df)


def two_sided_p(t, df):
    """P(|T| >= |t|) for Student's t with df degrees of freedom: I_{df / (df + t^2)}(df / 2, 1 / 2)."""
    return betainc(df / 2, 0.5, df / (df + t * t))


def mean_std(values):
    """'mean +- sample standard deviation' (n - 1 in the denominator)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
    return f"{mean:.2f} +- {std:.2f}"


def avsmss(root):
    """CAVP Sec. 5.2: TPAVI on AVSBench S4 and on AVS-M-SS (runs tpavi-s4-s*, tpavi-avsmss-s*), the test M_J and
    M_F of best.pt (what Sec. 5.2 calls mIoU and F_beta: the released TPAVI code's mask IoU and F-score), mean +-
    standard deviation and the two-sided t-tests S4 vs AVS-M-SS."""
    print("### AVS-M-SS (CAVP Sec. 5.2): TPAVI on AVSBench S4 and on S4 with VGGSound audio\n")
    figures = {}
    for subset, name in (("s4", "AVSBench S4"), ("avsmss", "AVS-M-SS")):
        res = [(s, final(d)) for s, d in runs(root, "tpavi", subset)]
        figures[name] = {key: [100 * r[key] for _, r in res] for key in ("mj", "mf")}
        figures[name]["seeds"] = ",".join(str(s) for s, _ in res)
    rows = [[name, f["seeds"], len(f["mj"]), mean_std(f["mj"]) if f["mj"] else "-",
             mean_std(f["mf"]) if f["mf"] else "-"] for name, f in figures.items()]
    print(table(["data", "seeds", "runs", "M_J (Sec. 5.2 'mIoU')", "M_F (Sec. 5.2 'F_beta')"], rows))
    a, b = figures.values()
    if min(len(a["mj"]), len(b["mj"])) < 2:
        print("\nt-test: needs at least 2 finished runs of each")
        return
    print("\ntwo-sided t-test, AVSBench S4 vs AVS-M-SS:")
    for key, label in (("mj", "M_J"), ("mf", "M_F")):
        parts = []
        for welch, test in ((False, "Student (pooled variance)"), (True, "Welch")):
            t, df, p = t_test(a[key], b[key], welch)
            parts.append(f"{test} t = {t:.3f}, df = {df:.2f}, p = {p:.3f}")
        print(f"- {label}: " + "; ".join(parts))
    print("\npaper (3 runs each): mIoU 72.01 +- 0.7 vs 72.07 +- 0.7, p = 0.66; F_beta 83.36 +- 1.2 vs 83.70 +- 1.0, "
          "p = 0.73")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="OUT folder of benchmarks/reproduce.sh (or stereo_probe.sh)")
    p.add_argument("--readings", action="store_true", help="the folder is the 'readings' part's")
    p.add_argument("--stereo-probe", action="store_true",
                   help="the folder is benchmarks/stereo_probe.sh's OUT: side accuracy curves and "
                   "the last evaluations")
    p.add_argument("--stereo", action="store_true", help="the folder is the 'stereo' part's")
    p.add_argument("--avsmss", action="store_true", help="the folder is the 'avsmss' part's (CAVP Sec. 5.2)")
    args = p.parse_args(argv)
    root = args.root
    if not os.path.isdir(root):
        sys.exit(f"{root} not found: pass the OUT folder of benchmarks/reproduce.sh")
    if args.readings:
        return readings(root)
    if args.stereo_probe:
        return stereo_probe(root)
    if args.stereo:
        return stereo(root)
    if args.avsmss:
        return avsmss(root)

    print("### 1. Table 4: CAVP vs TPAVI\n")
    print(metric_rows(root, ("tpavi", "tpavifusion", "cavp"), SUBSETS))
    for base in ("tpavi", "tpavifusion"):
        gaps = [(s, margin(root, "cavp", base, s)) for s in SUBSETS]
        print(f"\nCAVP - {NAMES[base]}, mIoU: " + ", ".join(f"{s.upper()} {g:+.2f}" for s, g in gaps
                                                             if g is not None))

    print("\n### 2. Fig. 7 / Table 8: stereo vs mono (CAVP)\n")
    print(metric_rows(root, ("cavp-mono", "cavp"), SUBSETS))
    gaps = [(s, margin(root, "cavp", "cavp-mono", s)) for s in SUBSETS]
    print("\nstereo - mono, mIoU: " + ", ".join(f"{s.upper()} {g:+.2f}" for s, g in gaps if g is not None))

    print("\n### 3. Table 5 on VPO-MSMI\n")
    print(metric_rows(root, ("tpavifusion", "ca", "supcon", "cavp"), ("msmi",)))
    steps = [("ca", "tpavifusion"), ("supcon", "ca"), ("cavp", "supcon")]
    print("\nstep by step, mIoU: " + ", ".join(f"{a} - {b} {g:+.2f}" for a, b in steps
                                              if (g := margin(root, a, b, "msmi")) is not None))

    print("\n### 4. Fig. 6 on VPO-MSMI: attention activation of f_CA (CAVP otherwise)\n")
    print(metric_rows(root, ("cavp", "softmax", "minmax"), ("msmi",),
                      names=dict(cavp="sigmoid", softmax="softmax", minmax="min-max")))

    print("\n### 5. Audio alignment: pixels segmented as a sounding object, real vs counterfactual audio\n")
    rows = []
    for s in SUBSETS:
        for m in ("tpavi", "tpavifusion", "ca", "supcon", "cavp-mono", "cavp"):
            fg = {}
            for audio in ("real", "silence", "absent"):
                files = [os.path.join(d, f"eval-{audio}.json") for _, d in runs(root, m, s)]
                fg[audio] = [load(f)["eval"] for f in files if os.path.isfile(f)]
            if not fg["real"] or len(fg["silence"]) != len(fg["real"]) or len(fg["absent"]) != len(fg["real"]):
                continue
            real = [100 * r["fg_pred"] for r in fg["real"]]
            row = [f"VPO-{s.upper()}", NAMES[m], len(real), spread([100 * fg["real"][0]["fg_true"]]), spread(real)]
            for audio in ("silence", "absent"):
                share = [100 * r["fg_pred"] for r in fg[audio]]
                row += [spread(share), spread([100 * a / b for a, b in zip(share, real) if b > 0], 0)]
            rows.append(row)
    print(table(["data", "model", "seeds", "ground truth, % px", "real audio, % px", "silence, % px",
                 "silence, % of real", "absent-class clip, % px", "absent, % of real"], rows))

if __name__ == "__main__":
    main()
