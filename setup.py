import pathlib

from setuptools import find_packages, setup

setup(
    name='refinenet_jax',
    version='0.1.0',
    description='RefineNet, FCN and ExFuse semantic segmentation in JAX/Flax',
    long_description=(pathlib.Path(__file__).parent / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['refinenet_jax', 'refinenet_jax.*', 'configs']),
    python_requires='>=3.11',
    install_requires=[
        'jax>=0.10.2',
        'flax>=0.12.8',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.11.36',  # not higher: the onnx extra's jax2onnx bounds it (README)
        'ml-collections>=1.1.0',
        'chex>=0.1.92',
        'absl-py>=2.1',
        'numpy>=2.0',
        'tensorflow-datasets>=4.9.10',
        # tfds 4.9.10 imports it for builders that live in a package but does not declare it
        'importlib_resources>=6.0',
        'array-record>=0.8',  # tfds' ArrayRecord writer/reader (no TensorFlow needed)
        'scipy>=1.11',  # SBD and PASCAL-Context .mat annotations
        'grain>=0.2.18',
        'pillow>=10.0',
        'opencv-python-headless>=4.8',
        'tensorboardX>=2.6',  # TensorBoard event files without TensorFlow
        'flatbuffers>=24.3',  # jax.export's serialization (export.py, serving.py)
        'tqdm>=4.66',  # the progress bar on a terminal (console.py)
        'matplotlib>=3.8',  # confusion matrix, per-class IoU and curves pictures (plots.py)
    ],
    extras_require={
        # nbclient/nbformat/ipykernel execute the Colab notebook in a test
        'test': ['pytest>=8', 'pytest-xdist>=3.5', 'nbclient>=0.10', 'nbformat>=5.10',
                 'ipykernel>=6.29'],
        # libtpu, paired with the installed jax: compiles for TPU topologies on any host (dry run)
        'tpu': ['jax[tpu]'],
        # Only for regenerating parity fixtures / side-by-side benchmarks; never needed to run.
        'torch': ['torch>=2.3'],
        # ONNX export (export_onnx.py), in a venv of its own: jax2onnx >= 0.13.1 declares
        # orbax-checkpoint < 0.11.37 (README, "ONNX export"); 0.17 is the first to convert a
        # strided lax.conv_transpose (ExFuse) correctly.
        'onnx': ['jax2onnx>=0.17.0', 'onnx>=1.20.1', 'onnxruntime>=1.24.1'],
    },
)
