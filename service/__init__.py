"""maskclip-service: the glue between a job spec and Ray Train / Ray Data / Ray Tune / MLflow."""
