# Inputs. The defaults match the names used in k8s/ (namespace, service account, role, buckets);
# tests/infra/test_infra.py checks that they agree.

variable "region" {
  description = "AWS region for the cluster and buckets."
  type        = string
  default     = "us-east-1"
}

variable "cluster_name" {
  description = "EKS cluster name."
  type        = string
  default     = "maskclip"
}

variable "kubernetes_version" {
  description = "EKS Kubernetes minor version."
  type        = string
  default     = "1.33"
}

variable "vpc_cidr" {
  description = "CIDR block of the cluster VPC."
  type        = string
  default     = "10.42.0.0/16"
}

variable "system_instance_types" {
  description = "Instance types of the CPU node group (system pods, MLflow, Ray head)."
  type        = list(string)
  default     = ["m6i.2xlarge"]
}

variable "gpu_instance_types" {
  description = "Instance types of the GPU node group (Ray GPU workers)."
  type        = list(string)
  default     = ["g5.2xlarge"]
}

variable "gpu_max_size" {
  description = "Upper bound of GPU nodes; the group scales from 0."
  type        = number
  default     = 4
}

variable "data_bucket" {
  description = "S3 bucket for training data (read) and checkpoints (write, under checkpoint_prefix)."
  type        = string
  default     = "maskclip-data"
}

variable "data_prefixes" {
  description = "Key prefixes in data_bucket that training may list and read (jobs/*.yaml: train/, val/)."
  type        = list(string)
  default     = ["train", "val"]
}

variable "checkpoint_prefix" {
  description = "Key prefix in data_bucket where Ray Train writes checkpoints; the only one it may write or delete under."
  type        = string
  default     = "checkpoints"
}

variable "artifact_bucket" {
  description = "S3 bucket for MLflow artifacts (served by the MLflow server under mlflow_artifact_prefix/)."
  type        = string
  default     = "maskclip-artifacts"
}

variable "mlflow_artifact_prefix" {
  description = "Key prefix in artifact_bucket of the MLflow artifact store (k8s/mlflow.yaml); the MLflow role's only one."
  type        = string
  default     = "mlflow"
}

variable "noncurrent_version_days" {
  description = "Days a replaced or deleted object version is kept in the versioned buckets before it expires."
  type        = number
  default     = 30
}

variable "cluster_endpoint_public_access_cidrs" {
  description = "CIDRs allowed to reach the EKS API endpoint from the internet. Empty (the default): the endpoint is private, reachable only from the VPC (a VPN or bastion). To run Terraform from a laptop, list its egress address, e.g. [\"203.0.113.4/32\"]."
  type        = list(string)
  default     = []

  validation {
    condition     = !contains(var.cluster_endpoint_public_access_cidrs, "0.0.0.0/0")
    error_message = "cluster_endpoint_public_access_cidrs must not contain 0.0.0.0/0: list the addresses that need the API."
  }
}

variable "k8s_namespace" {
  description = "Kubernetes namespace of maskclip workloads (k8s/namespace.yaml)."
  type        = string
  default     = "maskclip"
}

variable "k8s_training_service_accounts" {
  description = "Kubernetes service accounts bound to the training IAM role (k8s/serviceaccount.yaml)."
  type        = list(string)
  default     = ["maskclip-ray-head", "maskclip-ray-worker"]
}

variable "k8s_mlflow_service_account" {
  description = "Kubernetes service account bound to the MLflow IAM role (k8s/serviceaccount.yaml)."
  type        = string
  default     = "maskclip-mlflow"
}

variable "training_role_name" {
  description = "Name of the IAM role assumed through IRSA by the Ray head and workers."
  type        = string
  default     = "maskclip-training"
}

variable "mlflow_role_name" {
  description = "Name of the IAM role assumed through IRSA by the MLflow server."
  type        = string
  default     = "maskclip-mlflow"
}

variable "kuberay_chart_version" {
  description = "Pinned version of the kuberay-operator Helm chart (>= 1.6: RayCluster authOptions, token-authenticated dashboard calls)."
  type        = string
  default     = "1.6.2"
}

variable "tags" {
  description = "Extra tags for every AWS resource."
  type        = map(string)
  default     = {}
}
