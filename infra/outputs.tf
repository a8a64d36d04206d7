# Values the k8s/ manifests and the README steps need.

output "cluster_name" {
  description = "EKS cluster name (for `aws eks update-kubeconfig --name`)."
  value       = module.eks.cluster_name
}

output "region" {
  description = "AWS region."
  value       = var.region
}

output "training_role_arn" {
  description = "IAM role ARN of the Ray head and worker service accounts (k8s/serviceaccount.yaml)."
  value       = module.training_irsa.iam_role_arn
}

output "mlflow_role_arn" {
  description = "IAM role ARN of the maskclip-mlflow service account (k8s/serviceaccount.yaml)."
  value       = module.mlflow_irsa.iam_role_arn
}

output "data_bucket" {
  description = "Bucket with training data and checkpoints."
  value       = aws_s3_bucket.this["data"].bucket
}

output "artifact_bucket" {
  description = "Bucket with MLflow artifacts."
  value       = aws_s3_bucket.this["artifacts"].bucket
}

output "kubeconfig_command" {
  description = "Command that writes a kubeconfig entry for the cluster."
  value       = "aws eks update-kubeconfig --name ${module.eks.cluster_name} --region ${var.region}"
}
