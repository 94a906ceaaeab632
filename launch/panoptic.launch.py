"""Launch the CIAE panoptic segmentation node.

    ros2 launch ciae_ros panoptic.launch.py image_topic:=/my_camera/image_raw device:=cuda
    ros2 launch ciae_ros panoptic.launch.py input_transport:=compressed namespace:=front
    ros2 launch ciae_ros panoptic.launch.py lifecycle:=true     # managed node, configure/activate yourself

Parameters come from ``params_file`` (default: the installed config/panoptic.yaml). The launch
arguments weights/engine/device/input_transport default to "" (not given); only those given on the
command line are passed on top of the params file, so the params file's values stand otherwise
(the decision lives in ``ciae_ros.launch_support``, which is unit-tested without ``launch``).

``image_topic`` defaults to the relative ``camera/image_raw``, as the node does on its own: in the
root namespace that is ``/camera/image_raw``, with ``namespace:=front`` ``/front/camera/image_raw``.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition, UnlessCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode, Node
from launch_ros.substitutions import FindPackageShare

from ciae_ros.launch_support import DEFAULT_IMAGE_TOPIC, PARAMETER_ARGUMENTS, parameter_overrides

PACKAGE = "ciae_ros"
EXECUTABLE = "panoptic_node"
NODE_NAME = "ciae_panoptic"
PARAMS_FILE = "config/panoptic.yaml"


def _nodes(context):
    """The node actions, built once the launch arguments have values."""
    given = {name: LaunchConfiguration(name).perform(context) for name in PARAMETER_ARGUMENTS}
    overrides = parameter_overrides(given)
    parameters = [LaunchConfiguration("params_file")] + ([overrides] if overrides else [])
    common = dict(package=PACKAGE, executable=EXECUTABLE, name=NODE_NAME,
                  namespace=LaunchConfiguration("namespace"), parameters=parameters,
                  remappings=[("image", LaunchConfiguration("image_topic"))], output="screen")
    plain = Node(condition=UnlessCondition(LaunchConfiguration("lifecycle")), **common)
    managed = LifecycleNode(condition=IfCondition(LaunchConfiguration("lifecycle")), arguments=["--lifecycle"],
                            **common)
    return [plain, managed]


def generate_launch_description():
    args = [
        DeclareLaunchArgument("image_topic", default_value=DEFAULT_IMAGE_TOPIC,
                              description="camera image topic (sensor_msgs/Image; <topic>/compressed when "
                                          "input_transport is compressed); relative names resolve in 'namespace'"),
        DeclareLaunchArgument("params_file",
                              default_value=PathJoinSubstitution([FindPackageShare(PACKAGE), PARAMS_FILE]),
                              description="node parameter file"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node and its outputs"),
        DeclareLaunchArgument("weights", default_value="",
                              description="model file (.safetensors/.onnx); empty: as in params_file"),
        DeclareLaunchArgument("engine", default_value="",
                              description="auto, torch, onnxruntime or openvino; empty: as in params_file"),
        DeclareLaunchArgument("device", default_value="",
                              description="cpu, cuda or cuda:<index>; empty: as in params_file"),
        DeclareLaunchArgument("input_transport", default_value="",
                              description="raw or compressed; empty: as in params_file"),
        DeclareLaunchArgument("lifecycle", default_value="false",
                              description="run as a managed lifecycle node (model loads on configure)"),
    ]
    return LaunchDescription([*args, OpaqueFunction(function=_nodes)])
