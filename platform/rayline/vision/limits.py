"""What one request to a vision route may ask for, checked before any image is decoded
(rayline.vision.predictors.decode_images; the routes' schema counts the images). Over a
limit: 413 naming it (422 for too many images, from the schema)."""

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
"""The image files a request may hold (Pillow's format names)."""
MAX_IMAGES = 64
"""Images in one request (the routes' schema refuses more with 422)."""
MAX_IMAGE_PIXELS = 4096 * 4096
"""Pixels of one image, width x height from its header."""
MAX_REQUEST_PIXELS = 4096 * 4096
"""Pixels of all of a request's images together: a request's decoding is bounded by it
(48 MiB of RGB), whatever mix of sizes it sends."""
MAX_ASPECT = 16
"""The longer side over the shorter at most: the classifier's preset scales the shorter
side up to its resize size, so a 1 x 2,000 image would become 256 x 512,000."""
HEAVY_CLASSIFY_PIXELS = 1024 * 1024
"""A classification request over this many pixels runs on its model's heavy lane
(rayline.serving.work): decoding and resizing cost about 30 ms a megapixel."""
HEAVY_SEGMENT_PIXELS = 128 * 128
"""A segmentation request over this many pixels runs on its model's heavy lane: about
16 ms of a core at this size, growing with the pixels."""
MAX_SEGMENT_PIXELS = 1024 * 1024
"""Pixels of all of a segmentation request's images together. The segmenter computes
at full resolution: a resnet18 FCN held about 160 bytes and 1 microsecond of a core a
pixel (1024 x 1024: 166 MB and 1.1 s; 2048 x 2048: 644 MB and 4.7 s), so the request
limit above would let one request take 2.6 GB and 19 s."""
