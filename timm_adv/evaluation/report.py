"""Robustness reports: one JSON-serialisable dict, its markdown table, and PNG plots.

Report layout (every key optional)::

    {'model': str, 'dataset': str,
     'clean': {'top1', 'top5', 'samples'}, 'attack_subset_clean': {'top1', 'samples'},
     'pgd': [{'attack', 'eps', 'norm', 'steps', 'step_size', 'restarts', 'samples', 'top1'}, ...],
     'knn_guided': [{'eps', 'steps', 'guides', 'samples', 'top1'}, ...],   # kNN models: the guided attack
     'knn_worst': [{'eps', 'samples', 'top1'}, ...],   # kNN models: per-sample worst case, the robust figure
     'autoattack': {'version', 'attacks', 'norm', 'eps', 'samples', 'clean_top1', 'robust_top1', ...},
     'corruptions': {'source': 'folder' | 'generated', 'top1': {c: {s: acc}}, 'mean_top1', 'mce', ...},
     'shift': {name: {'top1', 'top5', 'samples', 'classes'}}}
"""
import json
import logging
import os
from typing import Dict, List, Optional, Tuple

__all__ = ['format_eps', 'report_rows', 'report_to_markdown', 'save_report', 'plot_accuracy_vs_eps',
           'plot_corruption_severity', 'save_plots', 'results_accuracy_vs_eps', 'plot_robustness_comparison']

_logger = logging.getLogger(__name__)


def format_eps(eps: float) -> str:
    """``0.2`` -> ``'0.2'``; ``0.0156862...`` -> ``'4/255'`` (a whole multiple of 1/255 without a short decimal)."""
    if round(eps, 4) == eps:
        return f'{eps:g}'
    k = eps * 255
    if abs(k - round(k)) < 1e-6 and round(k) > 0:
        return f'{round(k)}/255'
    return f'{eps:.4g}'


def report_rows(report: Dict) -> List[Dict[str, str]]:
    """The report as table rows: evaluation, setting, samples, top-1."""
    rows = []
    if 'clean' in report:
        c = report['clean']
        rows.append(dict(evaluation='Clean', setting='-', samples=c['samples'], top1=c['top1']))
    subset = report.get('attack_subset_clean')
    if subset:
        rows.append(dict(evaluation='Clean (attack subset)', setting='-', samples=subset['samples'], top1=subset['top1']))
    for p in report.get('pgd', []):
        name = 'FGSM' if p.get('steps') == 1 and p.get('attack') == 'fgsm' else f'PGD-{p["steps"]}'
        setting = f'{p["norm"]} eps={format_eps(p["eps"])}'
        if p.get('attack') != 'fgsm':
            setting += f', step={format_eps(p["step_size"])}, restarts={p.get("restarts", 1)}'
        rows.append(dict(evaluation=name, setting=setting, samples=p['samples'], top1=p['top1']))
    for p in report.get('knn_guided', []):
        rows.append(dict(evaluation=f'kNN-guided PGD-{p["steps"]}', setting=f'eps={format_eps(p["eps"])}, '
                         f'{p["guides"]} guides', samples=p['samples'], top1=p['top1']))
    for p in report.get('knn_worst', []):
        rows.append(dict(evaluation='kNN worst case (per sample)', setting=f'eps={format_eps(p["eps"])}, soft-vote '
                         f'PGD and guided', samples=p['samples'], top1=p['top1']))
    aa = report.get('autoattack')
    if aa:
        setting = f'{aa["version"]} ({", ".join(aa["attacks"])}), {aa["norm"]} eps={format_eps(aa["eps"])}'
        if aa.get('iterations'):
            setting += ', iterations ' + ', '.join(
                f'{k} {v}' + (' queries' if k == 'square' else '') for k, v in aa['iterations'].items())
        elif aa.get('n_iter', 100) != 100:
            setting += f', {aa["n_iter"]} iterations'
        if aa.get('subset'):
            setting += f', {aa["subset"]} subset'
        rows.append(dict(evaluation='AutoAttack', setting=setting, samples=aa['samples'], top1=aa['robust_top1']))
        rows.append(dict(evaluation='Clean (AutoAttack subset)', setting='-', samples=aa['samples'],
                         top1=aa['clean_top1']))
    corr = report.get('corruptions')
    if corr:
        label = 'ImageNet-C folder' if corr['source'] == 'folder' else 'Corruptions (regenerated)'
        n_sev = len(next(iter(corr['top1'].values())))
        setting = f'{len(corr["top1"])} corruptions x {n_sev} severities, mean top-1'
        if corr.get('protocol'):
            setting += f', {corr["protocol"]} protocol'
        rows.append(dict(evaluation=label, setting=setting, samples=corr['samples'], top1=corr['mean_top1']))
        if 'mce' in corr:
            rows.append(dict(evaluation=f'{label} mCE (lower is better)', setting='normalised by AlexNet',
                             samples=corr['samples'], top1=corr['mce']))
    for name, s in report.get('shift', {}).items():
        setting = f'{s["classes"]}-class subset of the logits' if s.get('classes', 1000) != 1000 else '1000 classes'
        rows.append(dict(evaluation=name, setting=setting, samples=s['samples'], top1=s['top1']))
    return rows


def report_to_markdown(report: Dict) -> str:
    """A markdown table of the report (top-1 in percent; mCE in percent, lower is better)."""
    lines = ['| Evaluation | Setting | Samples | Top-1 (%) |', '|---|---|---:|---:|']
    for r in report_rows(report):
        lines.append(f'| {r["evaluation"]} | {r["setting"]} | {r["samples"]} | {r["top1"]:.2f} |')
    corr = report.get('corruptions')
    if corr and corr.get('note'):
        lines.append('')
        lines.append(f'Note: {corr["note"]}')
    if corr and corr.get('transform'):
        lines.append('')
        lines.append(f'ImageNet-C images: {corr["transform"]}.')
    return '\n'.join(lines)


def save_report(report: Dict, out_dir: str, plots: bool = True) -> Dict[str, str]:
    """Writes ``robustness.json``, ``robustness.md`` and (with matplotlib) PNG plots to ``out_dir``.

    Returns:
        Paths written, by kind.
    """
    os.makedirs(out_dir, exist_ok=True)
    written = {'json': os.path.join(out_dir, 'robustness.json'), 'markdown': os.path.join(out_dir, 'robustness.md')}
    with open(written['json'], 'w') as f:
        json.dump(report, f, indent=2)
    with open(written['markdown'], 'w') as f:
        f.write(report_to_markdown(report) + '\n')
    if plots:
        written.update(save_plots(report, out_dir))
    for kind, path in written.items():
        _logger.info(f'Wrote {kind}: {path}')
    return written


def _pyplot():
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("Plots need matplotlib: pip install 'timm-adv[eval]' (or: pip install matplotlib).") from None
    return plt


def _save_accuracy_axes(plt, fig, ax, path: str, xlabel: str, title: str, legend: Optional[Dict] = None) -> str:
    """Labels a top-1 (0-100 %) plot, saves it as a PNG and closes it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel('top-1 accuracy (%)')
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(**(legend or dict(fontsize=8)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy_vs_eps(report: Dict, path: str) -> Optional[str]:
    """Top-1 against eps for each PGD/FGSM setting (eps 0 is the clean accuracy). None if < 2 eps."""
    groups: Dict[str, list] = {}
    for p in report.get('pgd', []):
        key = f'{"FGSM" if p.get("attack") == "fgsm" else "PGD-" + str(p["steps"])} ({p["norm"]})'
        groups.setdefault(key, []).append((p['eps'], p['top1']))
    if not any(len(v) >= 2 for v in groups.values()):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, points in groups.items():
        points = sorted(points)
        if 'clean' in report:
            points = [(0.0, report['clean']['top1'])] + points
        ax.plot([e for e, _ in points], [a for _, a in points], marker='o', label=key)
    aa = report.get('autoattack')
    if aa:
        ax.scatter([aa['eps']], [aa['robust_top1']], marker='*', s=120, color='k', zorder=3,
                   label=f'AutoAttack {aa["version"]}')
    return _save_accuracy_axes(plt, fig, ax, path, 'eps (pixel scale [0, 1])', f'Accuracy vs eps: {report.get("model", "")}')


def results_accuracy_vs_eps(rows: List[Dict]) -> List[Tuple[float, float]]:
    """``(eps, top1)`` points of ``validate.py --results-file`` rows (eps 0: clean top-1), sorted by eps.

    Rows of several runs of one model (e.g. one eps each) merge into one curve.

    Example:
        >>> results_accuracy_vs_eps(json.load(open('pgd-at-validate.json')))
        [(0.0, 98.8), (0.05, 97.1), (0.1, 94.6)]
    """
    points = {}
    for row in rows:
        points[0.0] = row['top1']
        eps = [float(e) for e in str(row.get('eps', '')).split()]
        name = 'fgsm' if row.get('attack') == 'fgsm' else f'pgd{row.get("steps")}'
        for e in eps:
            key = f'{name}_top1' if len(eps) == 1 else f'{name}_top1@{e:.4g}'
            if key in row:
                points[e] = row[key]
    return sorted(points.items())


def plot_robustness_comparison(curves: Dict[str, List[Tuple[float, float]]], path: str, title: str = '',
                               xlabel: str = 'eps (L-inf, pixel scale [0, 1])') -> str:
    """Top-1 against eps for several models side by side (e.g. plain vs adversarially trained).

    Example:
        >>> plot_robustness_comparison({'plain': [(0, 98.3), (0.1, 1.1)], 'pgd-at': [(0, 98.8), (0.1, 94.6)]},
        ...                            'docs/images/demo_robustness.png')
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, points in curves.items():
        ax.plot([e for e, _ in points], [a for _, a in points], marker='o', label=label)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return _save_accuracy_axes(plt, fig, ax, path, xlabel, title)


def plot_corruption_severity(report: Dict, path: str) -> Optional[str]:
    """Top-1 against severity, one line per corruption (severity 0 is the clean accuracy)."""
    corr = report.get('corruptions')
    if not corr:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    clean = report.get('clean', {}).get('top1')
    for c, by_severity in corr['top1'].items():
        points = sorted((int(s), a) for s, a in by_severity.items())
        if clean is not None:
            points = [(0, clean)] + points
        ax.plot([s for s, _ in points], [a for _, a in points], marker='.', label=c)
    title = 'ImageNet-C folder' if corr['source'] == 'folder' else 'regenerated corruptions (imagecorruptions)'
    return _save_accuracy_axes(plt, fig, ax, path, 'severity (0 = clean)', f'Accuracy vs severity, {title}',
                               legend=dict(fontsize=6, ncol=2))


def save_plots(report: Dict, out_dir: str) -> Dict[str, str]:
    """Writes the plots that the report has data for; returns their paths by name."""
    written = {}
    for name, plot in (('accuracy_vs_eps', plot_accuracy_vs_eps), ('accuracy_vs_severity', plot_corruption_severity)):
        path = plot(report, os.path.join(out_dir, f'{name}.png'))
        if path:
            written[name] = path
    return written
