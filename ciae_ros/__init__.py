"""ciae_ros: ROS 2 node and glue over ciae_core's Predictor.

The generated message modules (``ciae_ros.msg``) are built by rosidl into the install space (the
venv here, the colcon install space on a ROS machine). When working from the source tree the
source ``ciae_ros/`` has no ``msg/``; extending ``__path__`` lets ``ciae_ros.msg`` resolve to the
installed generated package while our modules come from the source tree.
"""

__path__ = __import__("pkgutil").extend_path(__path__, __name__)
