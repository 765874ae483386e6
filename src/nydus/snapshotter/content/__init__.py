"""Image content: containerd's Content service over our own store (:mod:`.store`,
:mod:`.service`) with the Nydus hooks (:mod:`.nydusblobs`, :mod:`.remotelayers`), and the
client-side labelled pull of ``nydus-pull`` (:mod:`.pull`)."""
