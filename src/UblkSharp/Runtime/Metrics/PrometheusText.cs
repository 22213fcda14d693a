using System.Globalization;
using System.Text;
using UblkSharp.Nbd;

namespace UblkSharp.Runtime.Metrics;

/// <summary>
/// Devices' figures in the Prometheus text exposition format (version 0.0.4): counters of requests,
/// bytes, errors and retries per device and queue, requests in flight, and a latency histogram per
/// device and operation over the fixed buckets of <see cref="LatencyHistogram"/> (their upper bounds
/// as `le`, in seconds). An NBD server's figures follow as the `ublksharp_nbd_` families: the same
/// per export (summed over its live and closed connections), connections open, accepted, closed and
/// refused, and per live connection (`connection`, `peer`) its requests, bytes, errors and
/// requests in flight (no histogram per connection: a thousand clients would make it huge).
/// </summary>
public static class PrometheusText
{
    public const string ContentType = "text/plain; version=0.0.4; charset=utf-8";

    public static string Write(IEnumerable<DeviceStats> devices) => Write(devices, null);

    /// <summary>Devices' figures and, if given, an NBD server's (`serve`, with or without --ublk).</summary>
    public static string Write(IEnumerable<DeviceStats> devices, NbdServerStats? nbd)
    {
        var all = devices.OrderBy(d => d.Device).ToList();
        var b = new StringBuilder(4096);
        if (all.Count > 0 || nbd is null)
        {
            WriteDevices(b, all);
        }
        if (nbd is not null)
        {
            WriteNbd(b, nbd);
        }
        return b.ToString();
    }

    private static void WriteDevices(StringBuilder b, List<DeviceStats> all)
    {
        Family(b, "ublksharp_requests_total", "counter", "Requests answered, by device, queue and operation", all, (d, q) =>
            Enumerable.Range(0, QueueStats.OpCount).Select(i => ($"op=\"{DeviceStats.OpName((StatOp)i)}\"", (double)q.Requests[i])));
        Family(b, "ublksharp_bytes_total", "counter", "Bytes read and written, by device, queue and operation", all, (d, q) =>
            Enumerable.Range(0, 2).Select(i => ($"op=\"{DeviceStats.OpName((StatOp)i)}\"", (double)q.Bytes[i])));
        Family(b, "ublksharp_errors_total", "counter", "Requests answered with an error, by device, queue and errno", all, (d, q) =>
            q.Errors.OrderBy(e => e.Key).Select(e => ($"errno=\"{Interop.Errno.Name(e.Key)}\"", (double)e.Value)));
        Family(b, "ublksharp_retries_total", "counter", "Backend steps submitted again (short IO, EAGAIN)", all, (d, q) =>
            [("", (double)q.Retries)]);
        Family(b, "ublksharp_inflight_requests", "gauge", "Requests the daemon holds", all, (d, q) =>
            [("", (double)q.InFlight)]);
        b.Append("# HELP ublksharp_request_duration_seconds Time from a request's arrival to its answer, by device and operation\n");
        b.Append("# TYPE ublksharp_request_duration_seconds histogram\n");
        foreach (var d in all)
        {
            Histogram(b, "ublksharp_request_duration_seconds", $"device=\"{d.Device}\"", d.Total);
        }
    }

    private static void WriteNbd(StringBuilder b, NbdServerStats s)
    {
        Single(b, "ublksharp_nbd_connections", "gauge", "NBD connections open now, in their handshake or past it", s.OpenConnections);
        Single(b, "ublksharp_nbd_connections_accepted_total", "counter", "NBD connections accepted, refused ones included", s.Accepted);
        Single(b, "ublksharp_nbd_connections_closed_total", "counter", "NBD connections served and closed", s.Closed);
        Single(b, "ublksharp_nbd_connections_refused_total", "counter", "NBD connections refused because the most allowed (--max-connections) were open", s.Refused);
        var exports = s.Exports.Select(e => ($"export=\"{Escape(e.Name)}\"", e.Total)).ToList();
        var connections = s.Connections.Select(c => ($"connection=\"{c.Id}\",export=\"{Escape(c.Export)}\",peer=\"{Escape(c.Peer)}\"", c.Figures)).ToList();
        foreach (var (prefix, what, series) in new[] { ("ublksharp_nbd_", "by export", exports), ("ublksharp_nbd_connection_", "on each live connection", connections) })
        {
            Family(b, prefix + "requests_total", "counter", $"NBD requests answered, {what} and operation", series, f =>
                Enumerable.Range(0, QueueStats.OpCount).Select(i => ($"op=\"{DeviceStats.OpName((StatOp)i)}\"", (double)f.Requests[i])));
            Family(b, prefix + "bytes_total", "counter", $"NBD bytes read and written, {what} and operation", series, f =>
                Enumerable.Range(0, 2).Select(i => ($"op=\"{DeviceStats.OpName((StatOp)i)}\"", (double)f.Bytes[i])));
            Family(b, prefix + "errors_total", "counter", $"NBD requests answered with an error, {what} and errno", series, f =>
                f.Errors.OrderBy(e => e.Key).Select(e => ($"errno=\"{Interop.Errno.Name(e.Key)}\"", (double)e.Value)));
            Family(b, prefix + "inflight_requests", "gauge", $"NBD requests in flight, {what}", series, f =>
                [("", (double)f.InFlight)]);
        }
        b.Append("# HELP ublksharp_nbd_request_duration_seconds Time from an NBD request's header to its reply, by export and operation\n");
        b.Append("# TYPE ublksharp_nbd_request_duration_seconds histogram\n");
        foreach (var (labels, total) in exports)
        {
            Histogram(b, "ublksharp_nbd_request_duration_seconds", labels, total);
        }
    }

    private static void Histogram(StringBuilder b, string name, string labels, QueueStatsSnapshot t)
    {
        for (var i = 0; i < QueueStats.OpCount; i++)
        {
            var opLabels = $"{labels},op=\"{DeviceStats.OpName((StatOp)i)}\"";
            long cumulative = 0;
            for (var k = 0; k < LatencyHistogram.BucketCount - 1; k++)
            {
                cumulative += t.Latency[i][k];
                b.Append(name).Append("_bucket{").Append(opLabels).Append(",le=\"")
                    .Append(Seconds(LatencyHistogram.UpperBound(k))).Append("\"} ").Append(cumulative.ToString(CultureInfo.InvariantCulture)).Append('\n');
            }
            cumulative += t.Latency[i][LatencyHistogram.BucketCount - 1];
            b.Append(name).Append("_bucket{").Append(opLabels).Append(",le=\"+Inf\"} ").Append(cumulative.ToString(CultureInfo.InvariantCulture)).Append('\n');
            b.Append(name).Append("_sum{").Append(opLabels).Append("} ").Append(Seconds(t.LatencySumNs[i])).Append('\n');
            b.Append(name).Append("_count{").Append(opLabels).Append("} ").Append(cumulative.ToString(CultureInfo.InvariantCulture)).Append('\n');
        }
    }

    private static void Single(StringBuilder b, string name, string type, string help, long value)
        => b.Append("# HELP ").Append(name).Append(' ').Append(help).Append('\n')
            .Append("# TYPE ").Append(name).Append(' ').Append(type).Append('\n')
            .Append(name).Append(' ').Append(value.ToString(CultureInfo.InvariantCulture)).Append('\n');

    private static void Family(StringBuilder b, string name, string type, string help, List<(string Labels, QueueStatsSnapshot Figures)> series,
        Func<QueueStatsSnapshot, IEnumerable<(string Labels, double Value)>> samples)
    {
        b.Append("# HELP ").Append(name).Append(' ').Append(help).Append('\n');
        b.Append("# TYPE ").Append(name).Append(' ').Append(type).Append('\n');
        foreach (var (labels, figures) in series)
        {
            foreach (var (more, value) in samples(figures))
            {
                b.Append(name).Append('{').Append(labels);
                if (more.Length > 0)
                {
                    b.Append(',').Append(more);
                }
                b.Append("} ").Append(value.ToString("R", CultureInfo.InvariantCulture)).Append('\n');
            }
        }
    }

    // Export names and peers are free text: a label value escapes backslashes, quotes and newlines.
    private static string Escape(string value)
        => value.Replace("\\", "\\\\", StringComparison.Ordinal).Replace("\"", "\\\"", StringComparison.Ordinal).Replace("\n", "\\n", StringComparison.Ordinal);

    private static string Seconds(long ns) => (ns / 1e9).ToString("R", CultureInfo.InvariantCulture);

    private static void Family(StringBuilder b, string name, string type, string help, List<DeviceStats> all,
        Func<DeviceStats, QueueStatsSnapshot, IEnumerable<(string Labels, double Value)>> samples)
    {
        b.Append("# HELP ").Append(name).Append(' ').Append(help).Append('\n');
        b.Append("# TYPE ").Append(name).Append(' ').Append(type).Append('\n');
        foreach (var d in all)
        {
            foreach (var q in d.Queues)
            {
                foreach (var (labels, value) in samples(d, q))
                {
                    b.Append(name).Append("{device=\"").Append(d.Device).Append("\",queue=\"").Append(q.Queue).Append('"');
                    if (labels.Length > 0)
                    {
                        b.Append(',').Append(labels);
                    }
                    b.Append("} ").Append(value.ToString("R", CultureInfo.InvariantCulture)).Append('\n');
                }
            }
        }
    }
}
