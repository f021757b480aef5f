// Command validate checks deployment files offline, for scripts/check-deploy.sh:
//
//	validate compose FILE      load a compose file as `docker compose config -q` does
//	validate crds FILE         strict-decode ServiceMonitor, PrometheusRule and ScaledObject
//	                           objects of a multi-document manifest into their Go API types
//	                           (unknown fields fail) and check PrometheusRule groups as
//	                           `promtool check rules` does
//	validate dashboard FILE    parse every PromQL expression of a Grafana dashboard
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
	kedav1alpha1 "github.com/kedacore/keda/v2/apis/keda/v1alpha1"
	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"
	yamlv3 "gopkg.in/yaml.v3"
	"sigs.k8s.io/yaml"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: validate compose|crds|dashboard FILE")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "compose":
		err = checkCompose(os.Args[2])
	case "crds":
		err = checkCRDs(os.Args[2])
	case "dashboard":
		err = checkDashboard(os.Args[2])
	default:
		err = fmt.Errorf("unknown check %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func checkCompose(path string) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	opts, err := cli.NewProjectOptions([]string{abs},
		cli.WithWorkingDirectory(filepath.Dir(abs)),
		cli.WithOsEnv,
		cli.WithDotEnv,
		cli.WithConsistency(true),
		cli.WithResolvedPaths(true),
	)
	if err != nil {
		return err
	}
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	for _, service := range project.Services {
		for _, volume := range service.Volumes {
			if volume.Type != "bind" {
				continue
			}
			if _, err := os.Stat(volume.Source); err != nil {
				return fmt.Errorf("%s: service %s mounts %s: %w", path, service.Name, volume.Source, err)
			}
		}
		if service.Build != nil {
			dockerfile := filepath.Join(service.Build.Context, service.Build.Dockerfile)
			if _, err := os.Stat(dockerfile); err != nil {
				return fmt.Errorf("%s: service %s builds from %s: %w", path, service.Name, dockerfile, err)
			}
		}
	}
	fmt.Printf("%s: %d services\n", path, len(project.Services))
	return nil
}

// strictDecode turns one manifest into the typed object, failing on unknown fields.
func strictDecode(doc []byte, into any) error {
	raw, err := yaml.YAMLToJSON(doc)
	if err != nil {
		return err
	}
	decoder := json.NewDecoder(bytes.NewReader(raw))
	decoder.DisallowUnknownFields()
	return decoder.Decode(into)
}

func checkCRDs(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	decoder := yamlv3.NewDecoder(bytes.NewReader(data))
	counts := map[string]int{}
	var problems []string
	for {
		var node map[string]any
		if err := decoder.Decode(&node); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return fmt.Errorf("%s: %w", path, err)
		}
		if node == nil {
			continue
		}
		kind, _ := node["kind"].(string)
		doc, err := yamlv3.Marshal(node)
		if err != nil {
			return err
		}
		name := kind
		if meta, ok := node["metadata"].(map[string]any); ok {
			name = fmt.Sprintf("%s/%v", kind, meta["name"])
		}
		var problem error
		switch kind {
		case "ServiceMonitor":
			var obj monitoringv1.ServiceMonitor
			problem = strictDecode(doc, &obj)
			if problem == nil && len(obj.Spec.Endpoints) == 0 {
				problem = errors.New("spec.endpoints is empty")
			}
		case "PrometheusRule":
			var obj monitoringv1.PrometheusRule
			problem = strictDecode(doc, &obj)
			if problem == nil {
				problem = checkRuleGroups(obj)
			}
		case "ScaledObject":
			var obj kedav1alpha1.ScaledObject
			problem = strictDecode(doc, &obj)
			if problem == nil {
				problem = checkScaledObject(obj)
			}
		default:
			continue
		}
		counts[kind]++
		if problem != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", name, problem))
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("%s:\n  %s", path, strings.Join(problems, "\n  "))
	}
	fmt.Printf("%s: valid %v\n", path, counts)
	return nil
}

// checkRuleGroups runs the PrometheusRule spec through Prometheus's own rule-file checks:
// PromQL parses, durations, label names, annotation templates.
func checkRuleGroups(rule monitoringv1.PrometheusRule) error {
	content, err := yaml.Marshal(rule.Spec)
	if err != nil {
		return err
	}
	_, errs := rulefmt.Parse(content, false, model.LegacyValidation, promql, slog.Default())
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	return nil
}

func checkScaledObject(obj kedav1alpha1.ScaledObject) error {
	spec := obj.Spec
	if spec.ScaleTargetRef == nil || spec.ScaleTargetRef.Name == "" {
		return errors.New("spec.scaleTargetRef.name is empty")
	}
	if spec.MinReplicaCount != nil && spec.MaxReplicaCount != nil && *spec.MinReplicaCount > *spec.MaxReplicaCount {
		return errors.New("minReplicaCount exceeds maxReplicaCount")
	}
	if len(spec.Triggers) == 0 {
		return errors.New("spec.triggers is empty")
	}
	for _, trigger := range spec.Triggers {
		if trigger.Type == "kafka" {
			for _, key := range []string{"bootstrapServers", "consumerGroup", "lagThreshold"} {
				if trigger.Metadata[key] == "" {
					return fmt.Errorf("kafka trigger needs metadata.%s", key)
				}
			}
		}
	}
	return nil
}

var promql = parser.NewParser(parser.Options{})

// Grafana variables replaced by values the parser accepts.
var grafanaVariables = strings.NewReplacer(
	"$__rate_interval", "5m",
	"$__interval", "1m",
	"$__range", "1h",
	"$namespace", ".*",
	"$job", ".*",
)

func checkDashboard(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var dashboard struct {
		Panels []struct {
			Title   string `json:"title"`
			Type    string `json:"type"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(data, &dashboard); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	exprs := 0
	var problems []string
	for _, panel := range dashboard.Panels {
		for _, target := range panel.Targets {
			if _, err := promql.ParseExpr(grafanaVariables.Replace(target.Expr)); err != nil {
				problems = append(problems, fmt.Sprintf("panel %q: %v", panel.Title, err))
			}
			exprs++
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("%s:\n  %s", path, strings.Join(problems, "\n  "))
	}
	fmt.Printf("%s: %d panels, %d PromQL expressions parse\n", path, len(dashboard.Panels), exprs)
	return nil
}
