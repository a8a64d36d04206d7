# Two IAM roles, each assumed through IRSA by its own Kubernetes service accounts
# (k8s/serviceaccount.yaml), so that neither can touch what only the other needs:
#   training (maskclip/maskclip-ray-head, maskclip/maskclip-ray-worker):
#     data bucket: list and read under var.data_prefixes/; read, write and delete only under
#     var.checkpoint_prefix/ (Ray Train writes checkpoints there and prunes old ones: `keep`)
#   mlflow (maskclip/maskclip-mlflow): list, read, write and delete under
#     var.mlflow_artifact_prefix/ of the artifacts bucket, nothing else. Training pods log
#     artifacts through the MLflow server (--serve-artifacts), never to S3 directly.
# No statement names a bucket-wide object ARN or "*". The buckets use SSE-KMS with the
# AWS-managed key, which needs no extra KMS grants.

locals {
  data_arn      = aws_s3_bucket.this["data"].arn
  artifacts_arn = aws_s3_bucket.this["artifacts"].arn
}

data "aws_iam_policy_document" "training_s3" {
  statement {
    sid       = "LocateDataBucket"
    actions   = ["s3:GetBucketLocation"]
    resources = [local.data_arn]
  }

  statement {
    sid       = "ListDataAndCheckpoints"
    actions   = ["s3:ListBucket"]
    resources = [local.data_arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values = concat(
        flatten([for p in var.data_prefixes : [p, "${p}/*"]]),
        [var.checkpoint_prefix, "${var.checkpoint_prefix}/*"],
      )
    }
  }

  statement {
    sid       = "ReadData"
    actions   = ["s3:GetObject"]
    resources = [for p in var.data_prefixes : "${local.data_arn}/${p}/*"]
  }

  statement {
    sid = "ReadWriteDeleteCheckpoints"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${local.data_arn}/${var.checkpoint_prefix}/*"]
  }
}

data "aws_iam_policy_document" "mlflow_s3" {
  statement {
    sid       = "LocateArtifactBucket"
    actions   = ["s3:GetBucketLocation"]
    resources = [local.artifacts_arn]
  }

  statement {
    sid       = "ListArtifacts"
    actions   = ["s3:ListBucket"]
    resources = [local.artifacts_arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = [var.mlflow_artifact_prefix, "${var.mlflow_artifact_prefix}/*"]
    }
  }

  statement {
    sid = "ReadWriteDeleteArtifacts"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${local.artifacts_arn}/${var.mlflow_artifact_prefix}/*"]
  }
}

resource "aws_iam_policy" "training_s3" {
  name        = "${var.training_role_name}-s3"
  description = "maskclip-service training: read data, read/write/delete its checkpoint prefix"
  policy      = data.aws_iam_policy_document.training_s3.json
}

resource "aws_iam_policy" "mlflow_s3" {
  name        = "${var.mlflow_role_name}-s3"
  description = "maskclip-service MLflow server: its artifact prefix only"
  policy      = data.aws_iam_policy_document.mlflow_s3.json
}

module "training_irsa" {
  source  = "terraform-aws-modules/iam/aws//modules/iam-role-for-service-accounts-eks"
  version = "5.60.0"

  role_name = var.training_role_name

  role_policy_arns = {
    s3 = aws_iam_policy.training_s3.arn
  }

  oidc_providers = {
    main = {
      provider_arn               = module.eks.oidc_provider_arn
      namespace_service_accounts = [for sa in var.k8s_training_service_accounts : "${var.k8s_namespace}:${sa}"]
    }
  }
}

module "mlflow_irsa" {
  source  = "terraform-aws-modules/iam/aws//modules/iam-role-for-service-accounts-eks"
  version = "5.60.0"

  role_name = var.mlflow_role_name

  role_policy_arns = {
    s3 = aws_iam_policy.mlflow_s3.arn
  }

  oidc_providers = {
    main = {
      provider_arn               = module.eks.oidc_provider_arn
      namespace_service_accounts = ["${var.k8s_namespace}:${var.k8s_mlflow_service_account}"]
    }
  }
}
