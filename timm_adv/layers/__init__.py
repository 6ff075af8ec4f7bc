from .dual_batchnorm import (
    AUX_BN_KEY, ROUTES, DualBatchNorm2d, aux_bn_state_dict, convert_dual_bn, dual_bn_layers, dual_bn_route,
    set_dual_bn_route, strip_aux_bn,
)
from .advbn import AdvBN, advbn_stages, get_advbn, insert_advbn, strip_advbn
from .transparent import register_transparent_child
from .projection_head import (
    PROJECTION_HEAD_KEY, ProjectionHead, insert_projection_head, split_projection_head_state, strip_projection_head,
)
