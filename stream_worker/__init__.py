"""lookout: a Kafka-native image classification service."""

__version__ = "0.1.0"
