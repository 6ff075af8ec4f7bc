"""Model cards (README.md) generated from the export's config, the hub config and measured results.

Nothing in a card is typed by hand: the method and its paper come from the method's task class
(``paper``, ``url``, ``citation``), the recipe from the training arguments, and the numbers
from the robustness report.
"""
import json
import os
from typing import Dict, List, Mapping, Optional

import yaml

from timm_adv.evaluation.report import report_to_markdown
from timm_adv.tasks import get_method
from timm_adv.utils import scrub_text

__all__ = ['method_reference', 'render_model_card', 'write_model_card']

_TIMM_CITATION = """@misc{rw2019timm,
  author = {Ross Wightman},
  title = {PyTorch Image Models},
  year = {2019},
  publisher = {GitHub},
  journal = {GitHub repository},
  doi = {10.5281/zenodo.4414861},
  howpublished = {\\url{https://github.com/huggingface/pytorch-image-models}}
}"""


def method_reference(name: str) -> Dict[str, str]:
    """Paper, URL and BibTeX of a method, as its task class declares them (``paper``, ``url``, ``citation``)."""
    try:
        cls = get_method(name or 'none')
    except ValueError:  # a method this version no longer registers (a card of an older export)
        return dict(paper=f'{name} (see the timm-adv documentation)', url='', citation='')
    return dict(paper=cls.paper, url=cls.url, citation=cls.citation)


def _front_matter(config: Mapping, meta: Mapping, hub_config: Mapping) -> str:
    data = dict(
        tags=['image-classification', 'timm', 'timm-adv', 'adversarial-training', 'robustness'],
        library_name='timm',
        license=config.get('pretrained_cfg', {}).get('license', 'apache-2.0'),
    )
    dataset = hub_config.get('dataset_hub_id')
    if dataset:
        data['datasets'] = [dataset]
    return '---\n' + yaml.safe_dump(data, sort_keys=False) + '---\n'


def _knn_usage(folder: str, repo_id: str, meta: Mapping) -> str:
    """How to classify with the feature model: a cosine kNN over a bank of labelled features."""
    from timm_adv.models import BANK_FILE
    args = meta.get('method_args', {})
    k, t = args.get('adv_knn_k', 75), args.get('adv_knn_temperature', 0.07)
    bank = os.path.isfile(os.path.join(folder, BANK_FILE))
    names = meta.get('bank_label_names')
    text = ['### kNN classification\n',
            'The model outputs a feature vector, not logits: it was trained without labels (self-supervised) and '
            f'classifies by a cosine k-nearest-neighbour vote (k = {k}, neighbour weight exp(cos / {t})) over the '
            'L2-normalised features of a labelled set, as it was evaluated. ' +
            (f'`{BANK_FILE}` holds the training split embedded with these weights (`features`, `labels`).'
             if bank else 'Embed a labelled set of your task with the model to build the bank.') + '\n',
            '```python\nfrom timm_adv.models import KNNClassifier, load_feature_bank\n' +
            (f"import huggingface_hub\nbank = load_feature_bank(huggingface_hub.hf_hub_download('{repo_id}', "
             f"'{BANK_FILE}'))\n" if bank else
             'bank = build_feature_bank(model, labelled_loader)  # timm_adv.models.build_feature_bank\n') +
            f'knn = KNNClassifier(model, bank, k={k}, temperature={t})\n'
            'log_probs = knn(transform(img).unsqueeze(0))   # [1, classes]\n```\n',
            f'`python validate.py --model hf-hub:{repo_id} --knn --attack pgd` reports kNN top-1, clean, under PGD '
            'through the soft vote, under the kNN-guided attack on the representation, and under the per-sample '
            'worst case of both (`knn_worst*_top1`), the robust accuracy to quote: PGD alone stalls where all '
            'neighbours agree.\n']
    if names:
        text.append('Bank classes: ' + ', '.join(str(n) for n in names) + '.\n')
    return '\n'.join(text)


def _validation_section(record: Mapping, checkpoint: Optional[str]) -> str:
    """The run's own validation at the exported epoch: figures and the protocol they were measured with."""
    from timm_adv.evaluation import validation_rows
    source = ('the checkpoint' if record.get('source') == 'checkpoint' else
              "the run's summary.csv, protocol from its training arguments")
    text = ['### Validation during training\n',
            f'train.py validated every epoch; these are the figures of epoch {record.get("epoch")}, the exported '
            f'checkpoint{" " + checkpoint if checkpoint else ""}, read from {source}. The robust figure '
            'is PGD on a fixed evenly spaced subset of the split, the model in eval mode; eps in pixel units.\n',
            '| Evaluation | Setting | Samples | Top-1 (%) |\n|---|---|---:|---:|']
    for row in validation_rows(record):
        samples = row['samples'] if row['samples'] is not None else 'whole split'
        text.append(f'| {row["evaluation"]} | {row["setting"]} | {samples} | {row["top1"]:.2f} |')
    return '\n'.join(text) + '\n'


def render_model_card(
        folder: str,
        repo_id: str,
        report: Optional[Mapping] = None,
        hub_config: Optional[Mapping] = None,
        train_command: Optional[str] = None,
        plots: Optional[Mapping[str, str]] = None,
        validate_command: Optional[str] = None,
) -> str:
    """The README.md text of an export folder.

    The evaluation section shows the run's own last validation (figures and protocol, recorded by
    ``train.py`` in the checkpoint) and, when given, the ``report`` of a fresh evaluation of the export.

    Args:
        folder: Export folder (its config.json supplies architecture, preprocessing and metadata).
        repo_id: ``org/name`` used in the loading snippet.
        report: Robustness report (see :mod:`timm_adv.evaluation.report`); None: not evaluated yet.
        hub_config: The hub_configs YAML, for intended use, limits and reference numbers.
        train_command: The exact command that trained the weights.
        plots: Plot name -> file name inside ``folder``.
        validate_command: The validate.py command that measured ``report``.

    Example:
        >>> text = render_model_card('hub/run', 'me/resnet10t.pgd_mnist', report=report)
    """
    with open(os.path.join(folder, 'config.json')) as f:
        config = json.load(f)
    hub_config = hub_config or {}
    meta = config.get('timm_adv', {})
    if meta.get('imported'):
        return _render_imported_card(config, repo_id, report, hub_config)
    cfg = config.get('pretrained_cfg', {})
    method = meta.get('method', 'none')
    ref = method_reference(method)
    arch = config['architecture']
    lines: List[str] = [_front_matter(config, meta, hub_config)]
    lines.append(f'# Model card for {repo_id.split("/")[-1]}\n')
    feature_model = config.get('num_classes') == 0
    kind = 'feature extractor (`num_classes=0`, classified by a kNN)' if feature_model else 'image classifier'
    lines.append(f'A {arch} {kind} trained with **{method}** adversarial training using '
                 f'timm-adv and exported as a plain timm model: every training-only part '
                 f'was removed and the exported weights reproduce the trained model\'s outputs.\n')
    lines.append('## Model details\n')
    details = [
        ('Architecture', f'`{arch}` (plain timm, no custom code)'),
        ('Method', f'{method}: {ref["paper"]}' + (f' ({ref["url"]})' if ref['url'] else '')),
        ('Classes', str(config.get('num_classes'))),
        ('Input size', ' x '.join(str(v) for v in cfg.get('input_size', []))),
        ('Preprocessing', f'mean {tuple(cfg.get("mean", ()))}, std {tuple(cfg.get("std", ()))}, crop_pct '
                          f'{cfg.get("crop_pct")}, interpolation {cfg.get("interpolation")}'),
        ('Dataset', str(hub_config.get('dataset') or meta.get('dataset'))),
        ('Base weights', str(hub_config.get('base_weights') or meta.get('base_weights'))),
        ('Licence', str(cfg.get('license'))),
    ]
    if meta.get('attack'):
        details.append(('Training attack', f'`{meta["attack"]}`'))
    details += list(meta.get('details', {}).items())
    lines.append('| | |\n|---|---|\n' + '\n'.join(f'| {k} | {v} |' for k, v in details) + '\n')
    lines.append('## How to use\n')
    lines.append('```python\nimport timm, torch\n'
                 f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()\n"
                 'cfg = timm.data.resolve_data_config({}, model=model)\n'
                 'transform = timm.data.create_transform(**cfg)\n'
                 'logits = model(transform(img).unsqueeze(0))\n```\n')
    lines.append('The model expects the preprocessing above (timm applies it from `pretrained_cfg`). '
                 'Attacks and robustness numbers below are in pixel space [0, 1] (eps k/255).\n')
    if feature_model:
        lines.append(_knn_usage(folder, repo_id, meta))
    lines.append('## Training\n')
    for caption, file in meta.get('card_images', {}).items():
        lines.append(f'![{caption}]({file})\n\n{caption}.\n')
    if train_command:
        lines.append('Exact command:\n\n```bash\n' + train_command + '\n```\n')
    if os.path.isfile(os.path.join(folder, 'training_args.yaml')):
        lines.append('All arguments are in `training_args.yaml`; `python train.py --config training_args.yaml` '
                     'reruns the recipe.\n')
    recipe = meta.get('recipe', {})
    method_args = {k: v for k, v in meta.get('method_args', {}).items() if v is not None}
    if recipe or method_args:
        rows = [(k, v) for k, v in recipe.items() if v not in (None, '', 0.0) or k in ('epochs', 'lr')]
        rows += sorted(method_args.items())
        lines.append('| Hyper-parameter | Value |\n|---|---|\n' +
                     '\n'.join(f'| {k} | {v} |' for k, v in rows) + '\n')
    lines.append('## Evaluation\n')
    if meta.get('validation'):
        lines.append(_validation_section(meta['validation'], meta.get('checkpoint')))
    if report:
        if meta.get('validation'):
            lines.append('### Evaluation of the exported weights\n')
        lines.append(f'Measured by `timm_adv` on {report.get("dataset", "the validation split")}'
                     f'{" (" + report["split"] + " split)" if report.get("split") else ""}. '
                     'Top-1 accuracy in percent; attacks run on the exported model in eval mode; eps in pixel '
                     'units. AutoAttack is the official code (pyautoattack, fra31/auto-attack).\n')
        if validate_command:
            lines.append('Command:\n\n```bash\n' + validate_command + '\n```\n')
        lines.append(report_to_markdown(report) + '\n')
        for name, file in (plots or {}).items():
            lines.append(f'![{name.replace("_", " ")}]({file})\n')
    elif not meta.get('validation'):
        lines.append('Not evaluated yet.\n')
    reference = hub_config.get('paper_results')
    if reference:
        lines.append('Published reference numbers for this recipe (not measured on these weights): ' +
                     ', '.join(f'{k}: {v}' for k, v in reference.items()) + '.\n')
    lines.append('## Intended use and limitations\n')
    intended = hub_config.get('intended_use') or (
        'Research on adversarial robustness and as a robust backbone for fine-tuning. The robustness holds '
        'only for the threat model it was trained and evaluated for (see the attack settings above); it is '
        'not a certificate, and adaptive attacks beyond those listed may lower the numbers.')
    lines.append(intended + '\n')
    for limit in hub_config.get('limitations', []):
        lines.append(f'- {limit}')
    if hub_config.get('limitations'):
        lines.append('')
    lines.append('## Citation\n')
    citations = [c for c in (ref.get('citation'), _TIMM_CITATION) if c]
    lines.append('```bibtex\n' + '\n\n'.join(citations) + '\n```\n')
    return '\n'.join(lines)


def _published_rows(published: Mapping) -> List[str]:
    labels = dict(clean='Clean top-1 (ImageNet val)', autoattack='AutoAttack top-1')
    rows = [f'| {labels.get(k, k)} | {v}{"%" if not k.endswith("mCE") else ""} |' for k, v in published.items()
            if isinstance(v, (int, float))]
    if published.get('autoattack') is not None:
        rows.append(f'| Threat model | {published.get("threat_model")}, eps {published.get("eps")} (pixels in [0, 1]) |')
    if published.get('protocol'):
        rows.append(f'| Protocol | {published["protocol"]} |')
    return rows


def _render_imported_card(config: Mapping, repo_id: str, report: Optional[Mapping], hub_config: Mapping) -> str:
    """Card of a model imported from a published zoo: the source's figures, labelled as published."""
    imported = config['timm_adv']['imported']
    cfg = config.get('pretrained_cfg', {})
    arch, paper, published = config['architecture'], imported['paper'], imported['published']
    source = {'robustbench': 'RobustBench', 'easyrobust': 'EasyRobust'}[imported['source']]
    front = dict(tags=['image-classification', 'timm', 'timm-adv', 'imported', imported['source'],
                       'adversarial-robustness', 'robustness'],
                 library_name='timm', license=cfg.get('license', 'other'))
    if hub_config.get('dataset_hub_id'):
        front['datasets'] = [hub_config['dataset_hub_id']]
    model_args = imported.get('model_args') or {}
    lines = ['---\n' + yaml.safe_dump(front, sort_keys=False) + '---\n',
             f'# Model card for {repo_id.split("/")[-1]}\n',
             f'The {source} model `{imported["name"]}` ({paper["title"]}, {paper["venue"]}) as a plain timm '
             f'`{arch}`: imported by timm-adv, not trained by it. The weights are the published ones mapped '
             f'key for key; the input normalisation the source applies inside its model is in `pretrained_cfg`, '
             f'with the resize, crop and interpolation the source evaluates with. No custom code is needed.\n',
             '## Model details\n',
             '| | |\n|---|---|\n' + '\n'.join(f'| {k} | {v} |' for k, v in [
                 ('Architecture', f'`{arch}`' + (f' with `{model_args}`' if model_args else '') + ' (plain timm)'),
                 ('Source entry', f'`{imported["spec"]}`'),
                 ('Paper', f'[{paper["title"]}]({paper["url"]}) ({paper["venue"]})'),
                 ('Source weights', imported.get('source_weights') or imported.get('weights')),
                 ('Source weights layout', imported.get('layout')),
                 ('Source eval transform', imported.get('eval_transform')),
                 ('Preprocessing (pretrained_cfg)',
                  f'input {"x".join(str(v) for v in cfg.get("input_size", [])[1:])}, crop_pct {cfg.get("crop_pct")}, '
                  f'crop_mode {cfg.get("crop_mode")}, interpolation {cfg.get("interpolation")}, '
                  f'mean {tuple(cfg.get("mean", ()))}, std {tuple(cfg.get("std", ()))}'),
                 ('Licence', f'{cfg.get("license")}: {imported.get("license_note")}'),
             ]) + '\n',
             '## How to use\n',
             '```python\nimport timm, torch\n'
             f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()\n"
             'cfg = timm.data.resolve_data_config({}, model=model)\n'
             'transform = timm.data.create_transform(**cfg)\n'
             'logits = model(transform(img).unsqueeze(0))\n```\n',
             'Attacks must perturb pixels in [0, 1] before the normalisation above (timm-adv\'s attacks and '
             'validate.py do).\n',
             '## Published results\n',
             f'Figures published by {source} for the original model ([reference]({published.get("reference")})); '
             'they were not measured by timm-adv on these weights.\n',
             '| | Published |\n|---|---|\n' + '\n'.join(_published_rows(published)) + '\n']
    if published.get('autoattack') is not None:
        lines.append('Re-measure with the same protocol (needs the ImageNet validation set and a GPU):\n\n'
                     f'```bash\npython validate.py --model hf-hub:{repo_id} --pretrained --data-dir /data/imagenet '
                     '--protocol robustbench-imagenet\n```\n')
    lines.append('## Evaluation by timm-adv\n')
    if report:
        lines.append(f'Measured by timm-adv on {report.get("dataset", "the validation split")}. Top-1 in percent.\n')
        lines.append(report_to_markdown(report) + '\n')
    else:
        lines.append('Not measured by timm-adv yet; the figures above are the published ones.\n')
    lines.append('## Intended use and limitations\n')
    lines.append(hub_config.get('intended_use') or (
        'Research on adversarial robustness and as a robust backbone. Robustness holds only for the threat model '
        'it was evaluated for; it is not a certificate.') + '\n')
    for limit in hub_config.get('limitations', []):
        lines.append(f'- {limit}')
    lines.append('\n## Citation\n')
    lines.append(f'Cite the original work: {paper["title"]} ({paper["venue"]}), {paper["url"]}; and the source '
                 f'({source}). timm:\n')
    lines.append('```bibtex\n' + _TIMM_CITATION + '\n```\n')
    return '\n'.join(lines)


def write_model_card(folder: str, repo_id: str, **kwargs) -> str:
    """Writes ``README.md`` into the export folder (see :func:`render_model_card`); returns its path."""
    path = os.path.join(folder, 'README.md')
    with open(path, 'w') as f:
        f.write(scrub_text(render_model_card(folder, repo_id, **kwargs)))  # published: no secrets or home paths
    return path


