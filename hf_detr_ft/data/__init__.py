"""Stage 1, the data: a dataset folder (or Hub dataset) -> checked records -> ``datasets``.

Modules, in the order data passes through them:

    splits         the split names and every alias folders and files use for them
    layouts        COCO folder layouts -> annotation file and image folder per split
    formats/       COCO, Pascal VOC, YOLO, Hugging Face datasets -> COCO content per split
                   (``formats.coco_writer`` writes any of them back as COCO)
    image_files    image files checked and decoded the way training reads them
    records        COCO content -> checked annotation records + label map + problems
    box_checks     a split's boxes checked at once (numpy), in annotation order
    record_columns a split's checked records as columns -> one Arrow table
    dataset        records -> ``DetectionDataset`` (a ``datasets.DatasetDict`` per split)
    cache          a COCO folder's checked splits built once as Arrow files, then memory-mapped
    streaming      a Hub dataset's training split streamed (``--streaming``), the rest read whole
    dataset_report counts and every problem, as a table and files (``hf-detr-ft inspect``)
    preview        ground-truth pictures and a class chart of a dataset
    synthetic      seeded shape images in Roboflow layout (the demo and the tests)
"""
