"""Launch the CIAE panoptic segmentation node.

    ros2 launch ciae_ros panoptic.launch.py image_topic:=/my_camera/image_raw device:=cuda
    ros2 launch ciae_ros panoptic.launch.py input_transport:=compressed namespace:=front
    ros2 launch ciae_ros panoptic.launch.py lifecycle:=true     # managed node, configure/activate yourself

Parameters come from ``params_file`` (default: the installed config/panoptic.yaml); the launch
arguments weights/engine/device/input_transport are applied on top of it (they win).
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition, UnlessCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode, Node
from launch_ros.substitutions import FindPackageShare

PACKAGE = "ciae_ros"
EXECUTABLE = "panoptic_node"
NODE_NAME = "ciae_panoptic"
PARAMS_FILE = "config/panoptic.yaml"


def generate_launch_description():
    args = [
        DeclareLaunchArgument("image_topic", default_value="/camera/image_raw",
                              description="camera image topic (sensor_msgs/Image; <topic>/compressed "
                                          "when input_transport is compressed)"),
        DeclareLaunchArgument("params_file",
                              default_value=PathJoinSubstitution([FindPackageShare(PACKAGE), PARAMS_FILE]),
                              description="node parameter file"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node and its outputs"),
        DeclareLaunchArgument("weights", default_value="",
                              description="model file (.safetensors/.onnx); empty: the shipped model"),
        DeclareLaunchArgument("engine", default_value="torch", description="torch or onnxruntime"),
        DeclareLaunchArgument("device", default_value="cpu", description="cpu, cuda or cuda:<index>"),
        DeclareLaunchArgument("input_transport", default_value="raw", description="raw or compressed"),
        DeclareLaunchArgument("lifecycle", default_value="false",
                              description="run as a managed lifecycle node (model loads on configure)"),
    ]
    parameters = [
        LaunchConfiguration("params_file"),
        {
            "weights": LaunchConfiguration("weights"),
            "engine": LaunchConfiguration("engine"),
            "device": LaunchConfiguration("device"),
            "input_transport": LaunchConfiguration("input_transport"),
        },
    ]
    common = dict(package=PACKAGE, executable=EXECUTABLE, name=NODE_NAME,
                  namespace=LaunchConfiguration("namespace"), parameters=parameters,
                  remappings=[("image", LaunchConfiguration("image_topic"))], output="screen")
    plain = Node(condition=UnlessCondition(LaunchConfiguration("lifecycle")), **common)
    managed = LifecycleNode(condition=IfCondition(LaunchConfiguration("lifecycle")), arguments=["--lifecycle"],
                            **common)
    return LaunchDescription([*args, plain, managed])
