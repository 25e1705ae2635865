package main

// image-archive writes a one-layer image holding a single static binary as a `docker save`
// archive, which `ctr images import` reads. It makes the pause image without a registry or a
// Docker engine; it writes one file and starts nothing.

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path"
	"time"
)

func runImageArchive(args []string) int {
	fs := flag.NewFlagSet("image-archive", flag.ContinueOnError)
	binary := fs.String("binary", "", "static binary to put in the image")
	dest := fs.String("path", "/pause", "its path in the image, also the entrypoint")
	ref := fs.String("ref", "", "image reference, e.g. composemirror.local/pause:3.10")
	out := fs.String("out", "", "archive to write")
	if err := fs.Parse(args); err != nil || *binary == "" || *ref == "" || *out == "" {
		fmt.Fprintln(os.Stderr, "usage: image-archive --binary FILE --ref REF --out TAR [--path /pause]")
		return 2
	}
	if err := writeImageArchive(*binary, *dest, *ref, *out); err != nil {
		fmt.Fprintln(os.Stderr, "image-archive:", err)
		return 1
	}
	return 0
}

func writeImageArchive(binary, dest, ref, out string) error {
	content, err := os.ReadFile(binary)
	if err != nil {
		return err
	}
	// A fixed time keeps the image's digest stable from build to build.
	epoch := time.Unix(0, 0).UTC()
	var layer bytes.Buffer
	lw := tar.NewWriter(&layer)
	if err := lw.WriteHeader(&tar.Header{Name: path.Base(dest), Mode: 0o755, Size: int64(len(content)),
		ModTime: epoch, Typeflag: tar.TypeReg}); err != nil {
		return err
	}
	if _, err := lw.Write(content); err != nil {
		return err
	}
	if err := lw.Close(); err != nil {
		return err
	}
	layerSum := sha256.Sum256(layer.Bytes())
	config, err := json.Marshal(map[string]any{
		"architecture": "amd64",
		"os":           "linux",
		"created":      epoch.Format(time.RFC3339),
		"config":       map[string]any{"Entrypoint": []string{dest}, "User": "65535:65535"},
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{"sha256:" + hex.EncodeToString(layerSum[:])}},
	})
	if err != nil {
		return err
	}
	configSum := sha256.Sum256(config)
	configName := hex.EncodeToString(configSum[:]) + ".json"
	layerName := hex.EncodeToString(layerSum[:]) + "/layer.tar"
	manifest, err := json.Marshal([]map[string]any{
		{"Config": configName, "RepoTags": []string{ref}, "Layers": []string{layerName}},
	})
	if err != nil {
		return err
	}
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	defer f.Close()
	w := tar.NewWriter(f)
	for _, file := range []struct {
		name string
		data []byte
	}{{configName, config}, {layerName, layer.Bytes()}, {"manifest.json", manifest}} {
		if err := w.WriteHeader(&tar.Header{Name: file.name, Mode: 0o644, Size: int64(len(file.data)),
			ModTime: epoch, Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		if _, err := w.Write(file.data); err != nil {
			return err
		}
	}
	if err := w.Close(); err != nil {
		return err
	}
	return f.Close()
}
