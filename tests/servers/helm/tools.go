//go:build tools

// Records the command this module builds so `go mod tidy` keeps its deps.
package tools

import (
	_ "helm.sh/helm/v3/cmd/helm"
)
