"""Registry of published robust models that map exactly onto plain timm architectures.

Each :class:`ZooEntry` says where the weights come from (``robustbench:<name>`` or
``easyrobust:<name>``), which timm architecture holds them, how the source stores them (its key
layout and where its input normalisation lives), how the source evaluates (resize, crop,
interpolation, mean/std: the timm ``pretrained_cfg`` the import writes), the figures the source
published and the licence. Entries that cannot be expressed as a plain timm model are refused
with one line saying why (:data:`REFUSED`).

Example:
    >>> entry = get_zoo_entry('robustbench:Salman2020Do_50_2')
    >>> entry.architecture, entry.transform.crop_pct
    ('wide_resnet50_2', 0.875)
"""
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

__all__ = ['EvalTransform', 'ZooEntry', 'ZOO', 'REFUSED', 'SOURCES', 'LAYOUTS', 'get_zoo_entry', 'split_spec',
           'zoo_listing']

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RAW = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # the model takes pixels in [0, 1] unnormalised

#: Where each source keeps its input normalisation, and the key layout of its weights files.
LAYOUTS = {
    # robustbench ``normalize_model``: ImageNormalizer then the model under ``model.``; files hold the
    # inner model, possibly under 'state_dict' and with 'module.' / 'model.' prefixes
    'robustbench-normalized': 'inner model keys; normalisation (ImageNet mean/std) outside the weights',
    # robustbench entries built without the normalising wrapper: the model sees raw [0, 1] pixels
    'robustbench-raw': 'inner model keys; no normalisation (inputs in [0, 1])',
    # EasyRobust ``nn.Sequential(NormalizeByChannelMeanStd, model)``: '0.mean', '0.std', '1.<model keys>'
    'easyrobust': "'0.mean' / '0.std' normaliser buffers and '1.<timm 0.5.4 keys>' (or plain keys)",
    # AdvProp: as easyrobust, each BatchNorm also holds the auxiliary adversarial BN 'bn_adv' (training only)
    'easyrobust-advprop': "as easyrobust, plus '<bn>.bn_adv.*' auxiliary BatchNorms (dropped: eval uses the main BN)",
}


@dataclass(frozen=True)
class EvalTransform:
    """The source's eval transform in timm ``pretrained_cfg`` terms.

    ``crop_mode='squash'`` with ``crop_pct=1.0`` is a resize to exactly ``input_size`` (no crop);
    ``'center'`` resizes the shorter side to ``input_size / crop_pct`` and centre-crops.
    """
    input_size: Tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.875
    crop_mode: str = 'center'
    interpolation: str = 'bilinear'
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    description: str = ''


# RobustBench's named preprocessings (robustbench.data), normalisation filled in per entry
RES256_CROP224 = dict(crop_pct=0.875, interpolation='bilinear', description='Resize(256) + CenterCrop(224), bilinear')
BICUBIC_RES256_CROP224 = dict(crop_pct=0.875, interpolation='bicubic',
                              description='Resize(256, bicubic) + CenterCrop(224)')
RES224 = dict(crop_pct=1.0, crop_mode='squash', interpolation='bilinear', description='Resize((224, 224)), bilinear')
TIMM_XCIT = dict(crop_pct=1.0, interpolation='bicubic',
                 description="timm's XCiT eval transform: Resize(224, bicubic) + CenterCrop(224)")
# EasyRobust benchmarks/benchmark.py defaults: Resize(int(224 / 0.875)) + CenterCrop(224), bicubic (PIL code 3)
EASYROBUST_DEFAULT = dict(crop_pct=0.875, interpolation='bicubic', description='Resize(256, bicubic) + CenterCrop(224)')


@dataclass(frozen=True)
class ZooEntry:
    """One importable published model.

    Attributes:
        source: ``'robustbench'`` or ``'easyrobust'``.
        name: The source's own name of the model.
        architecture: timm architecture holding the weights.
        layout: Key layout of the source's weights (a :data:`LAYOUTS` key).
        transform: The source's eval transform (becomes the ``pretrained_cfg``).
        published: Figures the source published (percent), with ``threat_model`` / ``eps`` / ``reference``.
        paper: ``(title, url, venue)`` of the method.
        license: Hub licence identifier; ``license_note`` explains it.
        weights: Where the source's loader reads the weights (gdrive id / URL), for the card.
        model_args: timm keyword arguments (widths of variants timm has no name for).
        family: Architecture family (the test suite covers one entry of each).
    """
    source: str
    name: str
    architecture: str
    layout: str
    transform: EvalTransform
    published: Mapping
    paper: Tuple[str, str, str]
    license: str
    license_note: str
    weights: str
    family: str
    model_args: Mapping = field(default_factory=dict)

    @property
    def spec(self) -> str:
        return f'{self.source}:{self.name}'

    @property
    def hub_name(self) -> str:
        """Suggested Hub model name: ``<timm architecture>.<source>_<name>``."""
        return f'{self.architecture}.{self.source}_{self.name.lower().replace("-", "_")}'


_MIT_MADRY = ('mit', 'released with the MIT-licensed MadryLab robustness library')
_UNSTATED = ('other', 'no licence stated by the authors; the weights are distributed by RobustBench (code: MIT)')
_EASYROBUST = ('apache-2.0', 'released by EasyRobust (Apache-2.0)')


def _rb(name, arch, layout, transform, clean, aa, paper, family, license=_UNSTATED, weights='', **model_args):
    mean, std = RAW if layout == 'robustbench-raw' else (IMAGENET_MEAN, IMAGENET_STD)
    return ZooEntry(
        source='robustbench', name=name, architecture=arch, layout=layout,
        transform=EvalTransform(mean=mean, std=std, **transform),
        published=dict(clean=clean, autoattack=aa, threat_model='Linf', eps='4/255', dataset='imagenet',
                       protocol='RobustBench ImageNet L-inf: 5,000 validation images, AutoAttack standard',
                       reference='https://robustbench.github.io/#div_imagenet_Linf_heading'),
        paper=paper, license=license[0], license_note=license[1], weights=weights, family=family,
        model_args=dict(model_args))


_SALMAN = ('Do Adversarially Robust ImageNet Models Transfer Better?', 'https://arxiv.org/abs/2007.08489',
           'NeurIPS 2020')
_DEBENEDETTI = ('A Light Recipe to Train Robust Vision Transformers', 'https://arxiv.org/abs/2209.07399',
                'arXiv, Sep 2022')
_LIU = ('A Comprehensive Study on Robustness of Image Classification Models: Benchmarking and Rethinking',
        'https://arxiv.org/abs/2302.14301', 'arXiv, Feb 2023')
_MO = ('When Adversarial Training Meets Vision Transformers: Recipes from Training to Architecture',
       'https://arxiv.org/abs/2210.07540', 'NeurIPS 2022')
_RODRIGUEZ = ('Characterizing Model Robustness via Natural Input Gradients', 'https://arxiv.org/abs/2409.20139',
              'arXiv, Sep 2024')
_XCIT_RELEASE = 'https://github.com/RobustBench/robustbench/releases/download/v1.1/'

_ROBUSTBENCH = [
    _rb('Engstrom2019Robustness', 'resnet50', 'robustbench-normalized', RES256_CROP224, 62.56, 29.22,
        ('Robustness (Python library)', 'https://github.com/MadryLab/robustness', 'GitHub, Oct 2019'), 'resnet',
        license=_MIT_MADRY, weights='gdrive:1T2Fvi1eCJTeAOEzrH_4TAIwO8HTOYVyn'),
    _rb('Salman2020Do_R50', 'resnet50', 'robustbench-normalized', RES256_CROP224, 64.02, 34.96, _SALMAN, 'resnet',
        license=_MIT_MADRY, weights='gdrive:1TmT5oGa1UvVjM3d-XeSj_XmKqBNRUg8r'),
    _rb('Salman2020Do_R18', 'resnet18', 'robustbench-normalized', RES256_CROP224, 52.92, 25.32, _SALMAN, 'resnet',
        license=_MIT_MADRY, weights='gdrive:1OThCOQCOxY6lAgxZxgiK3YuZDD7PPfPx'),
    _rb('Salman2020Do_50_2', 'wide_resnet50_2', 'robustbench-normalized', RES256_CROP224, 68.46, 38.14, _SALMAN,
        'resnet', license=_MIT_MADRY, weights='gdrive:1OT7xaQYljrTr3vGbM37xK9SPoPJvbSKB'),
    _rb('Chen2024Data_WRN_50_2', 'wide_resnet50_2', 'robustbench-raw', RES256_CROP224, 68.76, 40.60,
        ('Data filtering for efficient adversarial training', 'https://doi.org/10.1016/j.patcog.2024.110394',
         'Pattern Recognition 2024'), 'resnet', weights='gdrive:1-PBlZVILAKFQ7mF8srKjdkTKJZAr61Uf'),
    _rb('Debenedetti2022Light_XCiT-S12', 'xcit_small_12_p16_224', 'robustbench-raw', TIMM_XCIT, 72.34, 41.78,
        _DEBENEDETTI, 'xcit', weights=_XCIT_RELEASE + 'debenedetti2022light-xcit-s-imagenet-linf.pth.tar'),
    # timm has no name for the 12-layer XCiT-M / -L: xcit_small_12_p16_224's function with their widths
    _rb('Debenedetti2022Light_XCiT-M12', 'xcit_small_12_p16_224', 'robustbench-raw', TIMM_XCIT, 74.04, 45.24,
        _DEBENEDETTI, 'xcit', weights=_XCIT_RELEASE + 'debenedetti2022light-xcit-m-imagenet-linf.pth.tar',
        embed_dim=512),
    _rb('Debenedetti2022Light_XCiT-L12', 'xcit_small_12_p16_224', 'robustbench-raw', TIMM_XCIT, 73.76, 47.60,
        _DEBENEDETTI, 'xcit', weights=_XCIT_RELEASE + 'debenedetti2022light-xcit-l-imagenet-linf.pth.tar',
        embed_dim=768, num_heads=16),
    _rb('Liu2023Comprehensive_ConvNeXt-B', 'convnext_base', 'robustbench-normalized', BICUBIC_RES256_CROP224, 76.02,
        55.82, _LIU, 'convnext', weights='gdrive:10-nSm-qUftvfKXHeOAakBQl8rxm-jCbk'),
    _rb('Liu2023Comprehensive_ConvNeXt-L', 'convnext_large', 'robustbench-normalized', BICUBIC_RES256_CROP224, 78.02,
        58.48, _LIU, 'convnext', weights='gdrive:1dIPLNfdQtAnqZrKPyuy3_zDI-FVgJ2FH'),
    _rb('Liu2023Comprehensive_Swin-B', 'swin_base_patch4_window7_224', 'robustbench-normalized',
        BICUBIC_RES256_CROP224, 76.16, 56.16, _LIU, 'swin', weights='gdrive:1-4mtxQCkThJUVdS3wvQ6NnmMZuySqR3c'),
    _rb('Liu2023Comprehensive_Swin-L', 'swin_large_patch4_window7_224', 'robustbench-normalized',
        BICUBIC_RES256_CROP224, 78.92, 59.56, _LIU, 'swin', weights='gdrive:1-57sQfcrsDsslfDR18nRD7FnpQmsSBk7'),
    _rb('Mo2022When_Swin-B', 'swin_base_patch4_window7_224', 'robustbench-normalized', RES224, 74.66, 38.30, _MO,
        'swin', weights='gdrive:1-SXi4Z2X6Zo_j8EO4slJcBMXNej8fKUd'),
    _rb('Mo2022When_ViT-B', 'vit_base_patch16_224', 'robustbench-normalized', RES224, 68.38, 34.40, _MO, 'vit',
        weights='gdrive:1-dUFdvDBflqMsMLjZv3wlPJTm-Jm7net'),
    _rb('RodriguezMunoz2024Characterizing_Swin-B', 'swin_base_patch4_window7_224', 'robustbench-normalized',
        BICUBIC_RES256_CROP224, 77.76, 51.56, _RODRIGUEZ, 'swin', weights='gdrive:1-BSUjoFXx3PP-TfeE5fjbofO2lLyUf56'),
    _rb('RodriguezMunoz2024Characterizing_Swin-L', 'swin_large_patch4_window7_224', 'robustbench-normalized',
        BICUBIC_RES256_CROP224, 79.36, 53.82, _RODRIGUEZ, 'swin', weights='gdrive:1-Dc9WhPU2wv4OMskLo1U57n5O8VbpNXv'),
]

_PGD_AT = ('Towards Deep Learning Models Resistant to Adversarial Attacks (adversarial training)',
           'https://arxiv.org/abs/1706.06083', 'ICLR 2018')
_EASYROBUST_ZOO = 'http://alisec-competition.oss-cn-shanghai.aliyuncs.com/xiaofeng/'
_EASYROBUST_README = 'https://github.com/alibaba/easyrobust#model-zoo-and-baselines'
_EASYROBUST_FAMILY = {'resnet101': 'resnet', 'seresnet50': 'resnet', 'seresnet101': 'resnet', 'resnext50_32x4d': 'resnet',
                      'resnest50d': 'resnest', 'densenet121': 'densenet', 'vgg16': 'vgg'}


def _er(name, arch, clean, aa=None, layout='easyrobust', paper=_PGD_AT, weights=None, transform=EASYROBUST_DEFAULT,
        extra=None, model_args=None):
    published = dict(clean=clean, dataset='imagenet', reference=_EASYROBUST_README)
    if aa is not None:
        published.update(autoattack=aa, threat_model='Linf', eps='4/255',
                         protocol='EasyRobust AutoAttack benchmark: the 5,000 RobustBench ImageNet images, '
                                  'AutoAttack standard')
    published.update(extra or {})
    family = _EASYROBUST_FAMILY.get(arch) or arch.split('_')[0].rstrip('0123456789')
    return ZooEntry(source='easyrobust', name=name, architecture=arch, layout=layout,
                    transform=EvalTransform(**transform), published=published, paper=paper,
                    license=_EASYROBUST[0], license_note=_EASYROBUST[1],
                    weights=weights or f'{_EASYROBUST_ZOO}imagenet_pretrained_models/advtrain_models/{name}.pth',
                    family=family, model_args=dict(model_args or {}))


_DAT = ('Enhance the Visual Representation via Discrete Adversarial Training', 'https://arxiv.org/abs/2209.07735',
        'NeurIPS 2022')
_DAT_ZOO = 'http://alisec-competition.oss-cn-shanghai.aliyuncs.com/discrete_adversarial_training_models/'
_OOD = ('ImageNet-V2', 'ImageNet-C mCE', 'ImageNet-R', 'ImageNet-A', 'ImageNet-Sketch', 'Stylized-ImageNet', 'ObjectNet')

_EASYROBUST = [
    _er('advtrain_swin_base_patch4_window7_224_ep4', 'swin_base_patch4_window7_224', 75.05, 47.42),
    _er('advtrain_swin_small_patch4_window7_224_ep4', 'swin_small_patch4_window7_224', 73.41, 46.76),
    _er('advtrain_vit_base_patch16_224_ep4', 'vit_base_patch16_224', 70.64, 43.04),
    _er('advtrain_efficientnet_b3_ep4', 'efficientnet_b3', 67.65, 41.72),
    _er('advtrain_resnet101_ep4', 'resnet101', 69.51, 41.04),
    _er('advtrain_vit_small_patch16_224_ep4', 'vit_small_patch16_224', 66.43, 39.20),
    _er('advtrain_efficientnet_b2_ep4', 'efficientnet_b2', 64.75, 38.54),
    _er('advtrain_resnest50d_ep4', 'resnest50d', 70.03, 38.52),
    _er('advtrain_vit_base_patch32_224_ep4', 'vit_base_patch32_224', 65.58, 37.38),
    _er('advtrain_efficientnet_b1_ep4', 'efficientnet_b1', 63.99, 37.20),
    _er('advtrain_seresnet101_ep4', 'seresnet101', 71.11, 37.18),
    _er('advtrain_resnext50_32x4d_ep4', 'resnext50_32x4d', 67.39, 36.42),
    _er('advtrain_efficientnet_b0_ep4', 'efficientnet_b0', 61.83, 35.06),
    _er('advtrain_seresnet50_ep4', 'seresnet50', 66.68, 33.56),
    _er('advtrain_densenet121_ep4', 'densenet121', 60.90, 29.78),
    _er('advtrain_vgg16_ep4', 'vgg16', 59.96, 25.92),
    _er('pgd_at_resnet50', 'resnet50', 65.1, 34.9,
        weights=f'{_EASYROBUST_ZOO}easy_robust/benchmark_models/ours/examples/adversarial_training/model_best.pth.tar'),
    _er('dat_vit_base_patch16_224', 'vit_base_patch16_224', 81.38, paper=_DAT,
        weights=f'{_EASYROBUST_ZOO}easy_robust/benchmark_models/ours/examples/dat/model_best.pth.tar',
        extra=dict(zip(_OOD, (69.99, 45.59, 49.64, 24.61, 36.46, 24.84, 20.12)))),
    # the paper's official DAT weights (examples/imageclassification/imagenet/dat), evaluated with benchmark.py
    _er('dat_official_resnet50', 'resnet50', 76.52, paper=_DAT, weights=f'{_DAT_ZOO}resnet50_dat.pth',
        extra=dict(zip(_OOD, (65.02, 74.16, 41.90, 4.38, 27.27, 10.8)))),
    _er('dat_official_vit_base_patch16_224', 'vit_base_patch16_224', 81.46, paper=_DAT, weights=f'{_DAT_ZOO}vit_dat.pth',
        extra=dict(zip(_OOD, (70.83, 44.65, 47.34, 30.15, 34.77, 23.13)))),
    # EasyRobust's mae_vit_huge_patch14: the MAE fine-tuning ViT (mean of the patch tokens, then fc_norm, no final
    # norm), which is timm's ViT-H/14 with global_pool='avg' and fc_norm
    _er('dat_official_mae_vit_huge_patch14', 'vit_huge_patch14_224', 87.02, paper=_DAT,
        weights=f'{_DAT_ZOO}mae_dat.pth', model_args=dict(global_pool='avg', fc_norm=True),
        extra=dict(zip(_OOD, (78.82, 31.40, 65.61, 68.92, 50.03, 32.77)))),
    # benchmarks/non_adv_robust_bench.sh evaluates it with --interpolation 2 (bilinear)
    _er('advprop_resnet50', 'resnet50', 76.64, layout='easyrobust-advprop',
        paper=('Adversarial Examples Improve Image Recognition (AdvProp)', 'https://arxiv.org/abs/1911.09665',
               'CVPR 2020'),
        weights=f'{_EASYROBUST_ZOO}easy_robust/benchmark_models/ours/examples/advprop/model_best.pth.tar',
        transform=dict(EASYROBUST_DEFAULT, interpolation='bilinear',
                       description='Resize(256, bilinear) + CenterCrop(224)'),
        extra=dict(zip(_OOD, (64.35, 77.64, 37.43, 2.83, 24.71, 7.33, 16.82)))),
]

#: ``'source:name'`` -> entry.
ZOO: Dict[str, ZooEntry] = {e.spec: e for e in _ROBUSTBENCH + _EASYROBUST}

_CONVSTEM = 'a convolutional stem (Singh et al.) that timm\'s {} lacks'
#: ``'source:name'`` -> why it cannot be a plain timm model.
REFUSED: Dict[str, str] = {
    'robustbench:Wong2020Fast': 'RobustBench evaluates it on a 288 px centre crop of the unresized image, which '
                                "timm's eval transform (always a resize before the crop) cannot express",
    'robustbench:Standard_R50': "not adversarially trained: torchvision's ImageNet ResNet-50, already in timm as "
                                'resnet50.tv_in1k',
    **{f'robustbench:Singh2023Revisiting_{v}-ConvStem': _CONVSTEM.format('ViT' if v.startswith('ViT') else 'ConvNeXt')
       for v in ('ViT-S', 'ViT-B', 'ConvNeXt-T', 'ConvNeXt-S', 'ConvNeXt-B', 'ConvNeXt-L')},
    'robustbench:Peng2023Robust': 'RaWideResNet (robust-architecture WRN-101-2 with its own stem and block design), '
                                  'not a timm architecture',
    'robustbench:Bai2024MixedNUTS': 'an ensemble: a standard and a robust classifier mixed through a non-linear '
                                    'logit transform',
    'robustbench:Amini2024MeanSparse_ConvNeXt-L': 'MeanSparse post-processing layers inserted after the activations; '
                                                  'timm\'s ConvNeXt has no such layer',
    'robustbench:Amini2024MeanSparse_Swin-L': 'MeanSparse post-processing layers inserted after the activations; '
                                              'timm\'s Swin has no such layer',
    'robustbench:Xu2024MIMIR_Swin-B': "the original Swin code with LayerNorm eps 1e-6; timm's Swin uses 1e-5 and "
                                      'takes no argument to change it, so outputs would differ',
    'robustbench:Xu2024MIMIR_Swin-L': "the original Swin code with LayerNorm eps 1e-6 and window 14; timm's Swin "
                                      'uses eps 1e-5 and takes no argument to change it, so outputs would differ',
    'easyrobust:robustness_advtrain_resnet50_linf_eps4.0': 're-hosted MadryLab checkpoint without a benchmark '
                                                           'command; import robustbench:Salman2020Do_R50 instead',
    'easyrobust:free_adv_step4_eps4_repeat4': 're-hosted official Free-AT checkpoint; EasyRobust gives no benchmark '
                                              'command, so its layout and eval transform are undocumented',
    'easyrobust:fastadv_imagenet_model_weights_4px': 're-hosted official FGSM-AT checkpoint; RobustBench lists it as '
                                                     'Wong2020Fast, whose eval transform timm cannot express',
}

SOURCES = ('robustbench', 'easyrobust')


def split_spec(spec: str) -> Tuple[str, str]:
    """``'robustbench:Salman2020Do_R50'`` -> ``('robustbench', 'Salman2020Do_R50')``; errors name the form."""
    source, sep, name = str(spec).partition(':')
    if not sep or source not in SOURCES or not name:
        raise ValueError(f'Model spec {spec!r}: expected one of {", ".join(s + ":<name>" for s in SOURCES)} '
                         f'(list them with: python -m timm_adv.hub zoo).')
    return source, name


def get_zoo_entry(spec: str) -> ZooEntry:
    """The registry entry of ``spec``; refused entries raise with the reason, unknown ones list the choices."""
    split_spec(spec)
    if spec in REFUSED:
        raise ValueError(f'{spec} cannot be imported as a plain timm model: {REFUSED[spec]}.')
    if spec not in ZOO:
        source = spec.split(':')[0]
        known = sorted(k.split(':', 1)[1] for k in ZOO if k.startswith(source + ':'))
        raise ValueError(f'{spec} is not in the import registry. Supported {source} entries: {", ".join(known)}.')
    return ZOO[spec]


def zoo_listing(source: Optional[str] = None) -> Dict[str, list]:
    """Supported and refused entries (``python -m timm_adv.hub zoo``)."""
    keep = (lambda spec: spec.startswith(source + ':')) if source else (lambda spec: True)
    return dict(
        supported=[dict(spec=e.spec, architecture=e.architecture, model_args=dict(e.model_args),
                        clean=e.published.get('clean'), autoattack=e.published.get('autoattack'))
                   for e in ZOO.values() if keep(e.spec)],
        refused=[dict(spec=spec, reason=reason) for spec, reason in REFUSED.items() if keep(spec)])
