"""`appliance export`: the project's labels in formats training code reads.

    source.py   what is exported: the project's tasks from Label Studio (page by page), or the exact snapshot a
                model version was trained on (`--version`), as Items: one image, its objects as COCO RLE
    formats.py  the writers: coco, yolo-seg, masks, label-studio
    polygons.py one polygon per object for YOLO-seg, holes and separate parts kept by zero-width bridges
    run.py      the command: a folder or gs://bucket/prefix, images optional, a manifest written last
"""
