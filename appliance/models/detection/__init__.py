"""Instance segmentation with MMDetection (RTMDet-Ins by default): configs, training,
inference and evaluation. Import the submodules; this package imports nothing heavy."""
