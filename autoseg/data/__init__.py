"""Raw datasets: the folder format and its reading (``dataset``), verification, converters from public datasets and
synthetic demo data. May import the shared basics, ``autoseg.io`` and the contract (``labels``, ``plans``, ``paths``)."""
