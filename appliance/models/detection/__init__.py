"""Instance segmentation with MMDetection (sam-prompt, sam-det, RTMDet-Ins, Mask R-CNN): configs, training,
inference and evaluation. Import the submodules; this package imports nothing heavy."""

PRETRAINED_ARCH = "rtmdet-ins-tiny"  # the architecture of MMDetection's pretrained COCO checkpoints we import
