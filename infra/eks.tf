# EKS cluster with two managed node groups:
#   system: CPU nodes for kube-system, the KubeRay operator, MLflow and the Ray head.
#   gpu:    GPU nodes for Ray workers; tainted nvidia.com/gpu=present:NoSchedule so only pods that
#           tolerate it (k8s/raycluster.yaml, rendered RayJobs) land there; scales from 0.
# IRSA is on (enable_irsa) so the training and MLflow service accounts assume their IAM roles.
# The VPC CNI enforces NetworkPolicies (k8s/networkpolicy.yaml): enableNetworkPolicy.

module "eks" {
  source  = "terraform-aws-modules/eks/aws"
  version = "20.37.1"

  cluster_name    = var.cluster_name
  cluster_version = var.kubernetes_version

  vpc_id     = module.vpc.vpc_id
  subnet_ids = module.vpc.private_subnets

  # The API endpoint is private (reachable from the VPC) unless CIDRs are listed; never open to all.
  cluster_endpoint_private_access          = true
  cluster_endpoint_public_access           = length(var.cluster_endpoint_public_access_cidrs) > 0
  cluster_endpoint_public_access_cidrs     = var.cluster_endpoint_public_access_cidrs
  enable_cluster_creator_admin_permissions = true
  enable_irsa                              = true

  cluster_addons = {
    coredns    = {}
    kube-proxy = {}
    vpc-cni = {
      configuration_values = jsonencode({ enableNetworkPolicy = "true" })
    }
    eks-pod-identity-agent = {}
  }

  eks_managed_node_groups = {
    system = {
      ami_type       = "AL2023_x86_64_STANDARD"
      instance_types = var.system_instance_types
      min_size       = 1
      max_size       = 3
      desired_size   = 2
      block_device_mappings = {
        xvda = {
          device_name = "/dev/xvda"
          ebs = {
            volume_size           = 100
            volume_type           = "gp3"
            encrypted             = true
            delete_on_termination = true
          }
        }
      }
      labels = {
        "maskclip.io/pool" = "system"
      }
    }

    gpu = {
      # EKS-optimised AL2023 AMI with the NVIDIA driver and device plugin prerequisites.
      ami_type       = "AL2023_x86_64_NVIDIA"
      instance_types = var.gpu_instance_types
      min_size       = 0
      max_size       = var.gpu_max_size
      desired_size   = 0
      block_device_mappings = {
        xvda = {
          device_name = "/dev/xvda"
          ebs = {
            volume_size           = 200
            volume_type           = "gp3"
            encrypted             = true
            delete_on_termination = true
          }
        }
      }
      labels = {
        "maskclip.io/pool"       = "gpu"
        "nvidia.com/gpu.present" = "true"
      }
      taints = {
        gpu = {
          key    = "nvidia.com/gpu"
          value  = "present"
          effect = "NO_SCHEDULE"
        }
      }
    }
  }
}
