"""Install acmix_mm: ``pip install -e .`` (see the Makefile for the full, pinned stack)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r"__version__ = '([^']+)'", (HERE / 'acmix_mm' / 'version.py').read_text()).group(1)

setup(
    name='acmix_mm',
    version=VERSION,
    description='ACMix (Pan et al., CVPR 2022) backbones for mmdet/mmseg, trained through Lightning',
    long_description=(HERE / 'README.md').read_text() if (HERE / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    python_requires='>=3.9',
    packages=find_packages(include=['acmix_mm', 'acmix_mm.*']),
    include_package_data=True,
    # The C++ CPU attention kernel is compiled on first use (torch.utils.cpp_extension.load).
    package_data={'acmix_mm.ops': ['csrc/*.cpp', 'csrc/*.h']},
    # Only what the operator and the backbones need; detection, segmentation and Lightning
    # are extras so that either of mmdet / mmseg can be used alone.
    install_requires=['torch>=2.1', 'numpy', 'mmengine>=0.10.0,<0.11'],
    extras_require={
        'det': ['mmcv>=2.0.0,<2.2.0', 'mmdet==3.3.0', 'pycocotools', 'scipy', 'shapely', 'six',
                'terminaltables'],
        'seg': ['mmcv>=2.0.0,<2.2.0', 'mmsegmentation==1.2.2', 'ftfy', 'regex', 'prettytable'],
        'lightning': ['lightning>=2.2', 'tensorboard', 'matplotlib'],
        'export': ['onnx==1.23.2', 'onnxruntime==1.32.0', 'onnxscript==0.7.2'],
        'triton': ['triton>=3.4'],
        'tests': ['pytest', 'yacs', 'onnx==1.23.2', 'onnxruntime==1.32.0', 'onnxscript==0.7.2',
                  'triton>=3.4; platform_system == "Linux"'],
    },
    classifiers=[
        'Programming Language :: Python :: 3',
        'License :: OSI Approved :: Apache Software License',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
)
