# IAM role `maskclip-runner`, assumed through IRSA by the Kubernetes service account
# maskclip/maskclip-runner (k8s/serviceaccount.yaml). Least privilege:
#   data bucket:      list + read everything; write/delete only under var.checkpoint_prefix/
#   artifacts bucket: list + read/write/delete objects (MLflow artifact store)
# The buckets use SSE-KMS with the AWS-managed key, which needs no extra KMS grants.

data "aws_iam_policy_document" "runner_s3" {
  statement {
    sid       = "ListBuckets"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [aws_s3_bucket.this["data"].arn, aws_s3_bucket.this["artifacts"].arn]
  }

  statement {
    sid       = "ReadData"
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.this["data"].arn}/*"]
  }

  statement {
    sid = "WriteCheckpoints"
    actions = [
      "s3:PutObject",
      "s3:GetObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${aws_s3_bucket.this["data"].arn}/${var.checkpoint_prefix}/*"]
  }

  statement {
    sid = "ReadWriteArtifacts"
    actions = [
      "s3:PutObject",
      "s3:GetObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${aws_s3_bucket.this["artifacts"].arn}/*"]
  }
}

resource "aws_iam_policy" "runner_s3" {
  name        = "${var.runner_role_name}-s3"
  description = "maskclip-service: read training data, write checkpoints and MLflow artifacts"
  policy      = data.aws_iam_policy_document.runner_s3.json
}

module "runner_irsa" {
  source  = "terraform-aws-modules/iam/aws//modules/iam-role-for-service-accounts-eks"
  version = "5.60.0"

  role_name = var.runner_role_name

  role_policy_arns = {
    s3 = aws_iam_policy.runner_s3.arn
  }

  oidc_providers = {
    main = {
      provider_arn               = module.eks.oidc_provider_arn
      namespace_service_accounts = ["${var.k8s_namespace}:${var.k8s_service_account}"]
    }
  }
}
