"""nydusify (convert/): OCI images in registries to Nydus images, and back out again.

Verbs, each a module with one entry function:

- :func:`~nydus.convert.converter.convert`: pull, convert layers in parallel through the tar
  builder, merge, push blobs, bootstrap layer, config and manifest (``nydusify convert``);
- :func:`~nydus.convert.check.check`: validate a converted image and compare its file tree with
  the source's (``nydusify check``);
- :func:`~nydus.convert.mount.mount`: serve a remote Nydus image with ``nydusd``
  (``nydusify mount``);
- :func:`~nydus.convert.copy.copy_image`: copy a Nydus image with all its blobs
  (``nydusify copy``).

Support modules: ``remote`` (a reference plus its registry client, blob streams), ``image``
(manifest/index/config reading and writing, pure), ``store`` (where data blobs go: registry,
localfs, s3, oss), ``rootfs`` (file trees of OCI layers and of a bootstrap, compared),
``progress``. The CLI (``nydus.cli.nydusify``) only parses flags and calls these.
"""
