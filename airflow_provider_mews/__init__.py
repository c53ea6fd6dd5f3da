"""Apache Airflow provider for the Mews Connector API."""

__version__ = "0.1.0"
