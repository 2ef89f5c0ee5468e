"""The studio's widgets: charts, inline images, the status and navigation bars, form pieces."""
