odoo.define('llm_training.loss_curve', function (require) {
"use strict";

/**
 * The Results tab's loss curve: Odoo 11's `dashboard_graph` field widget (nvd3, loaded lazily)
 * drawn as a real line chart: steps on a numeric x axis, loss on a labelled y axis, one line per
 * series (training and validation loss) with a legend, every measured step a point. The field
 * holds the series as JSON (llm.training.job.loss_curve); its value is re-read on every render so
 * that Check Status refreshes the chart.
 */
var basic_fields = require('web.basic_fields');
var core = require('web.core');
var registry = require('web.field_registry');

var _t = core._t;

var LossCurve = basic_fields.JournalDashboardGraph.extend({
    className: 'o_dashboard_graph o_llm_loss_curve',

    init: function () {
        this._super.apply(this, arguments);
        this.id = _.uniqueId();
    },

    _render: function () {
        var self = this;
        this.data = JSON.parse(this.value || '[]');
        this.$el.empty();
        this.chart = null;
        if (!this.data.length) {
            this.$el.append($('<p class="text-muted o_llm_loss_curve_empty">').text(_t('No loss measured yet.')));
            return;
        }
        if (this.$el.is(':visible')) {
            this._draw();
        } else {
            // A notebook page's fields are rendered while the page is hidden, where nvd3 cannot
            // measure its container: draw when the page is shown (bootstrap's tab event).
            this._waitUntilShown();
        }
    },

    _waitUntilShown: function () {
        var self = this;
        $(document).off('shown.bs.tab.llm_loss_curve_' + this.id);
        $(document).on('shown.bs.tab.llm_loss_curve_' + this.id, function () {
            if (self.$el.is(':visible')) {
                $(document).off('shown.bs.tab.llm_loss_curve_' + self.id);
                self._draw();
            }
        });
    },

    _draw: function () {
        var self = this;
        nv.addGraph(function () {
            self.$el.find('svg').remove();
            // the svg's own height: Odoo's dashboard styles size it for a small kanban card
            self.$el.append('<svg>');  // parsed as markup: an svg element in the SVG namespace
            self.$('svg').css({height: 320, width: '100%'});
            self.chart = nv.models.lineChart()
                .margin({left: 70, right: 30, top: 20, bottom: 50})
                .height(320)
                .duration(0)  // drawn at once: no half-drawn lines in screenshots and tests
                .color(['#875A7B', '#21B799'])
                .showLegend(true)
                .useInteractiveGuideline(true);
            self.chart.xAxis.axisLabel(_t('Step')).tickFormat(d3.format('d'));
            self.chart.yAxis.axisLabel(_t('Loss')).tickFormat(d3.format('.3f'));
            d3.select(self.$('svg')[0]).datum(self.data).call(self.chart);
        });
    },

    destroy: function () {
        $(document).off('shown.bs.tab.llm_loss_curve_' + this.id);
        this._super.apply(this, arguments);
    },
});

registry.add('llm_loss_curve', LossCurve);

return LossCurve;
});
