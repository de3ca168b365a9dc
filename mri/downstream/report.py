"""Statistics, table and plot of a finished (or partly finished) protocol.

Per arm and region: the mean +- standard deviation over folds of the fold means (Dice, HD95). Against the `real` arm:
the per-fold paired differences, a paired t-test and a Wilcoxon signed-rank test over folds (Student 1908; Wilcoxon
1945), the smallest difference the fold-level t-test would detect with 80% power at alpha = 0.05 given the observed
spread, and a case-level Wilcoxon test over all held-out cases (each case is tested exactly once, by the model of
its fold). With k folds the exact Wilcoxon p-value cannot go below 2 / 2^k (0.0625 for 5 folds): a fold-level test
with few folds can fail to show a real effect, and never shows its absence.
"""

import math

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from mri.downstream.regions import REGIONS

METRICS = ('dice', 'hd95')


def _std(values):
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _paired_tests(diffs) -> dict:
    from scipy import stats
    diffs = np.asarray(diffs, dtype=np.float64)
    n = len(diffs)
    out = dict(n=n, diff_mean=float(diffs.mean()) if n else float('nan'), diff_std=_std(diffs),
               t_p=float('nan'), wilcoxon_p=float('nan'), wilcoxon_min_p=2.0 / 2 ** n if n else float('nan'),
               min_detectable=float('nan'))
    if n < 2:
        return out
    if np.all(diffs == 0):
        out.update(t_p=1.0, wilcoxon_p=1.0)
    else:
        out['t_p'] = float(stats.ttest_rel(diffs, np.zeros_like(diffs)).pvalue) if out['diff_std'] > 0 else 0.0
        out['wilcoxon_p'] = float(stats.wilcoxon(diffs).pvalue)
    # Smallest true mean difference a two-sided paired t-test finds with 80% power at alpha 0.05.
    t = stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.80, n - 1)
    out['min_detectable'] = float(t * out['diff_std'] / math.sqrt(n))
    return out


def summarise(fold_results: dict, arms: list) -> dict:
    """``fold_results[arm][fold] = {'mean': {region: {metric}}, 'per_case': {case: {region: {metric}}}}`` ->
    ``{'summary': ..., 'paired': ...}`` over the folds every arm has finished."""
    folds = sorted(set.intersection(*[set(fold_results.get(a, {})) for a in arms])) if arms else []
    summary, paired = {}, {}
    for arm in arms:
        summary[arm] = {}
        for r in REGIONS:
            summary[arm][r] = {}
            for m in METRICS:
                values = [fold_results[arm][k]['mean'][r][m] for k in folds]
                summary[arm][r][m] = dict(mean=float(np.mean(values)) if values else float('nan'), std=_std(values),
                                          per_fold=values)
    if 'real' in arms:
        for arm in arms:
            if arm == 'real':
                continue
            paired[arm] = {}
            for r in REGIONS:
                paired[arm][r] = {}
                for m in METRICS:
                    diffs = [fold_results[arm][k]['mean'][r][m] - fold_results['real'][k]['mean'][r][m] for k in folds]
                    res = _paired_tests(diffs)
                    res['per_fold'] = diffs
                    case_diffs = [fold_results[arm][k]['per_case'][c][r][m] - fold_results['real'][k]['per_case'][c][r][m]
                                  for k in folds for c in fold_results['real'][k]['per_case']]
                    case = _paired_tests(case_diffs)
                    res['case_level'] = dict(n=case['n'], diff_mean=case['diff_mean'], diff_std=case['diff_std'],
                                             wilcoxon_p=case['wilcoxon_p'], min_detectable=case['min_detectable'])
                    paired[arm][r][m] = res
    return dict(folds_complete=folds, summary=summary, paired=paired)


def _fmt(mean, std, digits=3):
    return 'n/a' if not np.isfinite(mean) else f'{mean:.{digits}f} +- {std:.{digits}f}'


def format_table(stats: dict, arms: list) -> str:
    """Markdown: scores per arm, then the paired differences to `real`."""
    head = '| arm | ' + ' | '.join(f'Dice {r}' for r in REGIONS) + ' | ' + ' | '.join(f'HD95 {r}' for r in REGIONS) + ' |'
    lines = [f'Folds complete: {len(stats["folds_complete"])}', '', head, '|' + '---|' * (1 + 2 * len(REGIONS))]
    for arm in arms:
        s = stats['summary'][arm]
        lines.append(f'| {arm} | ' + ' | '.join(_fmt(s[r]['dice']['mean'], s[r]['dice']['std']) for r in REGIONS) + ' | '
                     + ' | '.join(_fmt(s[r]['hd95']['mean'], s[r]['hd95']['std'], 2) for r in REGIONS) + ' |')
    if stats['paired']:
        lines += ['', '| arm - real | region | dDice (folds) | t-test p | Wilcoxon p (min) | detectable dDice | '
                      'dDice (cases) | Wilcoxon p (cases) | dHD95 (folds) |', '|' + '---|' * 9]
        for arm, per in stats['paired'].items():
            for r in REGIONS:
                d, h = per[r]['dice'], per[r]['hd95']
                lines.append(f'| {arm} | {r} | {_fmt(d["diff_mean"], d["diff_std"])} | {d["t_p"]:.3f} | '
                             f'{d["wilcoxon_p"]:.3f} ({d["wilcoxon_min_p"]:.3f}) | {d["min_detectable"]:.3f} | '
                             f'{_fmt(d["case_level"]["diff_mean"], d["case_level"]["diff_std"])} | '
                             f'{d["case_level"]["wilcoxon_p"]:.3f} | {_fmt(h["diff_mean"], h["diff_std"], 2)} |')
    return '\n'.join(lines)


# BraTS-like colours per arm position (repeat when there are more arms).
_COLOURS = [(60, 60, 60), (31, 119, 180), (44, 160, 44), (214, 39, 40), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def draw_plot(stats: dict, arms: list, path: str) -> None:
    """Dice per region: one panel per region, a column per arm with the fold means as dots and mean +- std as a bar."""
    import dnnlib
    font = PIL.ImageFont.load_default()
    col_w, panel_h, top, bottom, left = 36, 260, 30, 130, 40
    panel_w = col_w * len(arms) + 20
    width, height = left + panel_w * len(REGIONS) + 10, top + panel_h + bottom
    img = PIL.Image.new('RGB', (width, height), 'white')
    d = PIL.ImageDraw.Draw(img)

    def y_of(v):
        return top + (1 - v) * panel_h

    for tick in np.linspace(0, 1, 6):
        d.line([(left - 4, y_of(tick)), (width - 10, y_of(tick))], fill=(225, 225, 225))
        d.text((4, y_of(tick) - 6), f'{tick:.1f}', fill='black', font=font)
    for p, r in enumerate(REGIONS):
        x0 = left + p * panel_w
        d.rectangle([x0, top, x0 + panel_w - 10, top + panel_h], outline='black')
        d.text((x0 + 4, 8), f'Dice {r}', fill='black', font=font)
        for a, arm in enumerate(arms):
            s = stats['summary'][arm][r]['dice']
            cx, colour = x0 + 14 + a * col_w, _COLOURS[a % len(_COLOURS)]
            if np.isfinite(s['mean']):
                d.rectangle([cx - 8, y_of(s['mean']), cx + 8, y_of(0)], fill=tuple(200 + (c - 200) // 3 for c in colour))
                d.line([(cx, y_of(min(1, s['mean'] + s['std']))), (cx, y_of(max(0, s['mean'] - s['std'])))], fill=colour, width=2)
            for v in s['per_fold']:
                d.ellipse([cx - 3, y_of(v) - 3, cx + 3, y_of(v) + 3], fill=colour)
            label = PIL.Image.new('RGB', (bottom - 6, 12), 'white')
            ld = PIL.ImageDraw.Draw(label)
            ld.text((label.width - ld.textlength(arm[:22], font=font), 0), arm[:22], fill=colour, font=font)  # ends at the panel
            img.paste(label.rotate(90, expand=True), (cx - 6, top + panel_h + 4))
    with dnnlib.atomic_output(path, suffix='.png') as tmp:
        img.save(tmp)
