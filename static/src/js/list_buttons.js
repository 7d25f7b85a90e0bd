odoo.define('llm_training.list_buttons', function (require) {
"use strict";

/**
 * Odoo 11 list views have no header buttons: the Jobs list gets "New Fine-tuning Job" and the
 * Datasets list "Import from Conversations" beside Create, for managers (the wizards' actions are
 * theirs; the server checks again).
 */
var core = require('web.core');
var ListController = require('web.ListController');
var session = require('web.session');

var _t = core._t;

var WIZARDS = {
    'llm.training.job': {label: _t('New Fine-tuning Job'), action: 'llm_training.llm_training_job_wizard_action'},
    'llm.training.dataset': {label: _t('Import from Conversations'),
                             action: 'llm_training.llm_training_dataset_import_wizard_action'},
};

ListController.include({
    renderButtons: function () {
        this._super.apply(this, arguments);
        var wizard = WIZARDS[this.modelName];
        if (!wizard || !this.$buttons) {
            return;
        }
        var self = this;
        var $button = $('<button type="button" class="btn btn-default btn-sm o_llm_wizard_button">')
            .text(wizard.label).hide()
            .on('click', function () {
                self.do_action(wizard.action, {on_close: function () { self.reload(); }});
            });
        this.$buttons.append($button);
        session.user_has_group('llm_training.group_llm_manager').then(function (isManager) {
            $button.toggle(isManager);
        });
    },
});
});
