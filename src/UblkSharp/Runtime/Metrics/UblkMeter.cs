using System.Diagnostics.Metrics;
using UblkSharp.Nbd;

namespace UblkSharp.Runtime.Metrics;

/// <summary>
/// The figures of every live device and NBD server in this process, published through
/// System.Diagnostics.Metrics (a <see cref="Meter"/> named "UblkSharp"), so an OpenTelemetry
/// exporter or a MeterListener picks them up with no extra code. An NBD server's figures are
/// tagged with its address ("server"), its exports ("export") and, per connection, "connection"
/// and "peer". Every instrument is observable: nothing is recorded per IO beyond the
/// queues' own counters, which are read when a listener collects.
/// </summary>
public static class UblkMeter
{
    public const string Name = "UblkSharp";

    private static readonly Lock Gate = new();
    private static readonly Dictionary<object, Func<DeviceStats>> Sources = [];
    private static readonly Dictionary<object, Func<NbdServerStats>> NbdSources = [];

    public static Meter Meter { get; } = new(Name, DeviceRecord.CurrentVersion);

    static UblkMeter()
    {
        Meter.CreateObservableCounter("ublksharp.device.requests", () => Each((d, q) =>
            Enumerable.Range(0, QueueStats.OpCount).Select(i => new Measurement<long>(q.Requests[i], Tags(d, q, ("op", DeviceStats.OpName((StatOp)i)))))),
            "{request}", "Requests answered, by device, queue and operation");
        Meter.CreateObservableCounter("ublksharp.device.bytes", () => Each((d, q) =>
            Enumerable.Range(0, QueueStats.OpCount).Where(i => q.Bytes[i] > 0 || i < 2).Select(i => new Measurement<long>(q.Bytes[i], Tags(d, q, ("op", DeviceStats.OpName((StatOp)i)))))),
            "By", "Bytes read and written, by device, queue and operation");
        Meter.CreateObservableCounter("ublksharp.device.errors", () => Each((d, q) =>
            q.Errors.Select(e => new Measurement<long>(e.Value, Tags(d, q, ("errno", Interop.Errno.Name(e.Key)))))),
            "{request}", "Requests answered with an error, by device, queue and errno");
        Meter.CreateObservableCounter("ublksharp.device.retries", () => Each((d, q) =>
            new[] { new Measurement<long>(q.Retries, Tags(d, q)) }),
            "{step}", "Backend steps submitted again (short IO, EAGAIN)");
        Meter.CreateObservableUpDownCounter("ublksharp.device.inflight", () => Each((d, q) =>
            new[] { new Measurement<int>(q.InFlight, Tags(d, q)) }),
            "{request}", "Requests the daemon holds");
        Meter.CreateObservableGauge("ublksharp.device.latency", () => Snapshots().SelectMany(s =>
            Enumerable.Range(0, QueueStats.OpCount).Where(i => s.Total.Requests[i] > 0).SelectMany(i => DeviceStats.Quantiles.Select(quantile =>
                new Measurement<double>(s.Total.Percentile((StatOp)i, quantile) / 1e9,
                    new KeyValuePair<string, object?>("device", (long)s.Device),
                    new KeyValuePair<string, object?>("op", DeviceStats.OpName((StatOp)i)),
                    new KeyValuePair<string, object?>("quantile", quantile))))),
            "s", "Request latency percentiles since the device started, by device and operation (bucket upper bounds)");

        Meter.CreateObservableCounter("ublksharp.nbd.requests", () => EachExport((s, e) =>
            Enumerable.Range(0, QueueStats.OpCount).Select(i => new Measurement<long>(e.Total.Requests[i], NbdTags(s, e.Name, ("op", DeviceStats.OpName((StatOp)i)))))),
            "{request}", "NBD requests answered, by server, export and operation");
        Meter.CreateObservableCounter("ublksharp.nbd.bytes", () => EachExport((s, e) =>
            Enumerable.Range(0, 2).Select(i => new Measurement<long>(e.Total.Bytes[i], NbdTags(s, e.Name, ("op", DeviceStats.OpName((StatOp)i)))))),
            "By", "NBD bytes read and written, by server, export and operation");
        Meter.CreateObservableCounter("ublksharp.nbd.errors", () => EachExport((s, e) =>
            e.Total.Errors.Select(x => new Measurement<long>(x.Value, NbdTags(s, e.Name, ("errno", Interop.Errno.Name(x.Key)))))),
            "{request}", "NBD requests answered with an error, by server, export and errno");
        Meter.CreateObservableUpDownCounter("ublksharp.nbd.inflight", () => EachExport((s, e) =>
            new[] { new Measurement<int>(e.Total.InFlight, NbdTags(s, e.Name)) }),
            "{request}", "NBD requests in flight, by server and export");
        Meter.CreateObservableGauge("ublksharp.nbd.latency", () => EachExport((s, e) =>
            Enumerable.Range(0, QueueStats.OpCount).Where(i => e.Total.Requests[i] > 0).SelectMany(i => DeviceStats.Quantiles.Select(quantile =>
                new Measurement<double>(e.Total.Percentile((StatOp)i, quantile) / 1e9, NbdTags(s, e.Name, ("op", DeviceStats.OpName((StatOp)i)), ("quantile", quantile)))))),
            "s", "NBD request latency percentiles since the server started, by server, export and operation (bucket upper bounds)");
        Meter.CreateObservableUpDownCounter("ublksharp.nbd.connections", () => NbdSnapshots().Select(s =>
            new Measurement<int>(s.OpenConnections, new KeyValuePair<string, object?>("server", s.Address))),
            "{connection}", "NBD connections open now, by server");
        Meter.CreateObservableCounter("ublksharp.nbd.connections.accepted", () => NbdSnapshots().Select(s =>
            new Measurement<long>(s.Accepted, new KeyValuePair<string, object?>("server", s.Address))),
            "{connection}", "NBD connections accepted, refused ones included, by server");
        Meter.CreateObservableCounter("ublksharp.nbd.connections.closed", () => NbdSnapshots().Select(s =>
            new Measurement<long>(s.Closed, new KeyValuePair<string, object?>("server", s.Address))),
            "{connection}", "NBD connections served and closed, by server");
        Meter.CreateObservableCounter("ublksharp.nbd.connections.refused", () => NbdSnapshots().Select(s =>
            new Measurement<long>(s.Refused, new KeyValuePair<string, object?>("server", s.Address))),
            "{connection}", "NBD connections refused because the most allowed were open, by server");
        Meter.CreateObservableCounter("ublksharp.nbd.connection.requests", () => EachConnection((s, c) =>
            Enumerable.Range(0, QueueStats.OpCount).Select(i => new Measurement<long>(c.Figures.Requests[i], ConnectionTags(s, c, ("op", DeviceStats.OpName((StatOp)i)))))),
            "{request}", "NBD requests answered on each live connection, by operation");
        Meter.CreateObservableCounter("ublksharp.nbd.connection.bytes", () => EachConnection((s, c) =>
            Enumerable.Range(0, 2).Select(i => new Measurement<long>(c.Figures.Bytes[i], ConnectionTags(s, c, ("op", DeviceStats.OpName((StatOp)i)))))),
            "By", "NBD bytes read and written on each live connection, by operation");
        Meter.CreateObservableCounter("ublksharp.nbd.connection.errors", () => EachConnection((s, c) =>
            c.Figures.Errors.Select(x => new Measurement<long>(x.Value, ConnectionTags(s, c, ("errno", Interop.Errno.Name(x.Key)))))),
            "{request}", "NBD requests answered with an error on each live connection, by errno");
        Meter.CreateObservableUpDownCounter("ublksharp.nbd.connection.inflight", () => EachConnection((s, c) =>
            new[] { new Measurement<int>(c.Figures.InFlight, ConnectionTags(s, c)) }),
            "{request}", "NBD requests in flight on each live connection");
    }

    /// <summary>Publishes an NBD server's figures; <see cref="NbdServer"/> calls it as it starts.</summary>
    internal static void AddNbd(object owner, Func<NbdServerStats> source)
    {
        lock (Gate)
        {
            NbdSources[owner] = source;
        }
    }

    internal static void RemoveNbd(object owner)
    {
        lock (Gate)
        {
            NbdSources.Remove(owner);
        }
    }

    private static List<NbdServerStats> NbdSnapshots()
    {
        Func<NbdServerStats>[] sources;
        lock (Gate)
        {
            sources = [.. NbdSources.Values];
        }
        return [.. sources.Select(s => s())];
    }

    private static IEnumerable<Measurement<T>> EachExport<T>(Func<NbdServerStats, NbdExportStats, IEnumerable<Measurement<T>>> per)
        where T : struct
        => NbdSnapshots().SelectMany(s => s.Exports.SelectMany(e => per(s, e)));

    private static IEnumerable<Measurement<T>> EachConnection<T>(Func<NbdServerStats, NbdConnectionStats, IEnumerable<Measurement<T>>> per)
        where T : struct
        => NbdSnapshots().SelectMany(s => s.Connections.SelectMany(c => per(s, c)));

    private static KeyValuePair<string, object?>[] NbdTags(NbdServerStats s, string export, params (string Key, object Value)[] more)
        => [new("server", s.Address), new("export", export), .. more.Select(m => new KeyValuePair<string, object?>(m.Key, m.Value))];

    private static KeyValuePair<string, object?>[] ConnectionTags(NbdServerStats s, NbdConnectionStats c, params (string Key, object Value)[] more)
        => [new("server", s.Address), new("export", c.Export), new("connection", c.Id), new("peer", c.Peer), .. more.Select(m => new KeyValuePair<string, object?>(m.Key, m.Value))];

    /// <summary>Publishes a device's figures (its queues are running); <see cref="UblkDevice"/> calls it.</summary>
    internal static void Add(object owner, Func<DeviceStats> source)
    {
        lock (Gate)
        {
            Sources[owner] = source;
        }
    }

    internal static void Remove(object owner)
    {
        lock (Gate)
        {
            Sources.Remove(owner);
        }
    }

    private static List<DeviceStats> Snapshots()
    {
        Func<DeviceStats>[] sources;
        lock (Gate)
        {
            sources = [.. Sources.Values];
        }
        return [.. sources.Select(s => s())];
    }

    private static IEnumerable<Measurement<T>> Each<T>(Func<DeviceStats, QueueStatsSnapshot, IEnumerable<Measurement<T>>> per)
        where T : struct
        => Snapshots().SelectMany(d => d.Queues.SelectMany(q => per(d, q)));

    private static KeyValuePair<string, object?>[] Tags(DeviceStats d, QueueStatsSnapshot q, params (string Key, object Value)[] more)
    {
        var tags = new KeyValuePair<string, object?>[2 + more.Length];
        tags[0] = new("device", (long)d.Device);
        tags[1] = new("queue", (long)q.Queue);
        for (var i = 0; i < more.Length; i++)
        {
            tags[2 + i] = new(more[i].Key, more[i].Value);
        }
        return tags;
    }
}
