"""HRNet-16-Slim (``lighthrnet.HRNet16``): the W16-slim trunk with a slim head.

Same outputs as :class:`models.ocrnet.AuxHRNet`; only the main head is narrower
(1x1 conv 240 -> 120 without bias, BN-ReLU, 1x1 conv to the classes without bias).
"""
from .ocrnet import AuxHRNet

LIGHT_HEAD_CHANNELS = 120


class LightHRNet(AuxHRNet):
    def __init__(self, num_classes: int = 19, has_edge: bool = False, trunk: str = "w16_slim"):
        super().__init__(num_classes, has_edge, trunk,
                         head_mid_channels=LIGHT_HEAD_CHANNELS, head_bias=False)
