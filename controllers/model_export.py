# -*- coding: utf-8 -*-
"""Download an export as a zip, streamed from its folder: the files are read a chunk at a time
while the response is sent, never held in Odoo's memory."""
import os
import re

from odoo import http
from odoo.exceptions import AccessError, MissingError
from odoo.http import request
from werkzeug.wrappers import Response

from ..lib.export import runner


class ModelExportController(http.Controller):

    @http.route('/llm_training/export/<int:export_id>/download', type='http', auth='user', methods=['GET'])
    def download(self, export_id):
        export = request.env['llm.model.export'].browse(export_id)
        try:
            # The user's own rights on the export and on its model (company, record rules).
            export.check_access_rights('read')
            export.check_access_rule('read')
            export.model_id.check_access_rights('read')
            export.model_id.check_access_rule('read')
            state, folder, name = export.state, export.path, export.model_id.name
        except (AccessError, MissingError):
            return Response('Export %d: not found or not yours to read.\n' % export_id, status=404,
                            mimetype='text/plain')
        if state != 'done' or not folder:
            return Response('Export %d is not available (state %s).\n' % (export_id, state), status=409,
                            mimetype='text/plain')
        if not os.path.isdir(folder):
            # a cluster provider's export is on its shared storage, which this Odoo host may not mount
            return Response('Export %d is done, but its folder cannot be read from this Odoo host; take its files '
                            'from the path shown on the export.\n' % export_id, status=409, mimetype='text/plain')
        stem = '%s-%s-%d' % (re.sub(r'[^A-Za-z0-9._-]+', '-', name).strip('-') or 'model', export.format, export_id)
        return Response(runner.zip_stream(folder, stem), mimetype='application/zip', direct_passthrough=True,
                        headers=[('Content-Disposition', 'attachment; filename="%s.zip"' % stem)])
