# KubeRay operator (CRDs RayCluster / RayJob / RayService + controller), pinned chart version.
# It runs on the system node group; the RayCluster in k8s/raycluster.yaml and the RayJobs that
# `maskclip submit` creates are reconciled by it.

resource "helm_release" "kuberay_operator" {
  name             = "kuberay-operator"
  repository       = "https://ray-project.github.io/kuberay-helm/"
  chart            = "kuberay-operator"
  version          = var.kuberay_chart_version
  namespace        = "kuberay-system"
  create_namespace = true
  atomic           = true
  wait             = true

  depends_on = [module.eks]
}
