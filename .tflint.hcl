# tflint config for the rendered Terraform (inv validate runs tflint when it is installed).
# The bundled terraform ruleset needs no download; add the aws ruleset where plugins can be fetched:
#   plugin "aws" { enabled = true  version = "0.38.0"  source = "github.com/terraform-linters/tflint-ruleset-aws" }
config {
  call_module_type = "none"
}

plugin "terraform" {
  enabled = true
  preset  = "recommended"
}
