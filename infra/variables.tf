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

variable "checkpoint_prefix" {
  description = "Key prefix in data_bucket where Ray Train writes checkpoints."
  type        = string
  default     = "checkpoints"
}

variable "artifact_bucket" {
  description = "S3 bucket for MLflow artifacts (served by the MLflow server under mlflow/)."
  type        = string
  default     = "maskclip-artifacts"
}

variable "k8s_namespace" {
  description = "Kubernetes namespace of maskclip workloads (k8s/namespace.yaml)."
  type        = string
  default     = "maskclip"
}

variable "k8s_service_account" {
  description = "Kubernetes service account bound to the runner IAM role (k8s/serviceaccount.yaml)."
  type        = string
  default     = "maskclip-runner"
}

variable "runner_role_name" {
  description = "Name of the IAM role assumed through IRSA by the maskclip service account."
  type        = string
  default     = "maskclip-runner"
}

variable "kuberay_chart_version" {
  description = "Pinned version of the kuberay-operator Helm chart."
  type        = string
  default     = "1.5.1"
}

variable "tags" {
  description = "Extra tags for every AWS resource."
  type        = map(string)
  default     = {}
}
