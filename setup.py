"""pip route for ciae_core and ciae_ros (the colcon route is CMakeLists.txt; both use these sources).

The ROS message classes (ciae_ros.msg) are not built by pip: `make setup` builds msg/ with rosidl
into the same environment, and a colcon build does it on a ROS 2 install.
"""

from setuptools import setup

setup(
    name="ciae_ros",
    version="0.1.0",
    description="CIAE real-time panoptic segmentation: ROS-free library (ciae_core) and ROS 2 node (ciae_ros)",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["ciae_core", "ciae_core.cli", "ciae_ros"],
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy",
        "opencv-python-headless",
        "safetensors",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "onnx": ["onnx", "onnxscript", "onnxruntime-gpu"],
        "openvino": ["openvino", "nncf"],  # CPU engine and int8 quantisation (ciae_core.engine_openvino, .quantize)
        "numba": ["numba>=0.60"],  # compiled CPU fusion (ciae_core.fusion_kernels)
        "train": ["tensorboard"],
        "ros": ["rosbags"],
        "test": ["pytest"],
    },
    entry_points={
        "console_scripts": [
            "ciae-train = ciae_core.cli.train:main",
            "ciae-eval = ciae_core.cli.eval:main",
            "ciae-predict = ciae_core.cli.predict:main",
            "ciae-export = ciae_core.cli.export:main",
            "ciae-bench = ciae_core.cli.bench:main",
            "ciae-synth = ciae_core.cli.synth:main",
            "ciae-panoptic-node = ciae_ros.node:main",
            "ciae-demo = ciae_ros.demo:main",
            "ciae-bag = ciae_ros.bag:main",
            "ciae-topic = ciae_ros.topic_tool:main",
        ],
        # ciae-bench --node: the ROS layer registers its node benchmark with ciae_core's bench, which
        # never imports ciae_ros itself (ciae_core/cli/bench.py looks the group up by name)
        "ciae_core.bench_plugins": ["node = ciae_ros.bench_node:main", "spatial = ciae_ros.point_cloud:bench_rows"],
    },
)
