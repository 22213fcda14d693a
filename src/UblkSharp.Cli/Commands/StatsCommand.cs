using System.CommandLine;
using System.Globalization;
using UblkSharp.Runtime.Metrics;

namespace UblkSharp.Cli.Commands;

/// <summary>
/// `ublksharp stats [-n ID] [--json] [--watch SECONDS [--count N]]`: each daemon's live figures
/// (<see cref="StatsEndpoint"/>). Without --watch, totals since the device started; with it, rates
/// and latency percentiles over each interval, redrawn in place on a terminal.
/// </summary>
internal static class StatsCommand
{
    private static readonly TimeSpan QueryTimeout = TimeSpan.FromSeconds(5);

    public static Command Create()
    {
        var number = new Option<int?>("--number", "-n") { Description = "One device (default: every device a daemon serves)" };
        var json = new Option<bool>("--json") { Description = "Print one JSON object per device and line" };
        var watch = new Option<double?>("--watch") { Description = "Redraw rates every SECONDS until interrupted" };
        var count = new Option<int?>("--count") { Description = "With --watch: stop after N intervals" };
        var command = new Command("stats", "Show live figures of devices: requests, bytes, errors, latency percentiles") { number, json, watch, count };
        command.SetAction(r =>
        {
            var n = r.GetValue(number);
            if (n is < 0)
            {
                throw new ArgumentException($"bad device id {n}");
            }
            var interval = r.GetValue(watch);
            if (interval is <= 0 or > 3600)
            {
                throw new ArgumentException($"--watch takes seconds between 0 and 3600, not {interval}");
            }
            var rounds = r.GetValue(count);
            if (rounds is < 1)
            {
                throw new ArgumentException("--count takes a number of intervals, at least 1");
            }
            if (rounds is not null && interval is null)
            {
                throw new ArgumentException("--count goes with --watch");
            }
            Preflight.RequireDriver();
            uint[] ids = n is int one ? [(uint)one] : DeviceList.Ids();
            if (interval is null)
            {
                var now = Query(ids, n is not null);
                if (r.GetValue(json))
                {
                    PrintJson(now);
                }
                else
                {
                    Print(now, null, 0);
                }
                return 0;
            }
            using var cancel = new CancellationTokenSource();
            Console.CancelKeyPress += (_, e) => { e.Cancel = true; cancel.Cancel(); };
            var before = Query(ids, n is not null).ToDictionary(s => s.Device);
            for (var round = 0; rounds is null || round < rounds; round++)
            {
                if (cancel.Token.WaitHandle.WaitOne(TimeSpan.FromSeconds(interval.Value)))
                {
                    break;
                }
                var now = Query(n is not null ? ids : DeviceList.Ids(), n is not null);
                if (r.GetValue(json))
                {
                    PrintJson(now);
                }
                else
                {
                    if (!Console.IsOutputRedirected)
                    {
                        Console.Write("\u001b[H\u001b[2J"); // home and clear: redraw in place
                    }
                    Console.WriteLine($"every {interval.Value.ToString(CultureInfo.InvariantCulture)} s, {DateTime.Now:HH:mm:ss}; per second over the interval, latency of the interval's requests (Ctrl-C ends)");
                    Print(now, before, interval.Value);
                }
                before = now.ToDictionary(s => s.Device);
            }
            return 0;
        });
        return command;
    }

    // One object per device and line.
    private static void PrintJson(List<DeviceStats> now)
    {
        foreach (var s in now)
        {
            Console.WriteLine(s.ToJson());
        }
    }

    private static List<DeviceStats> Query(uint[] ids, bool required)
    {
        var result = new List<DeviceStats>();
        foreach (var id in ids)
        {
            if (StatsEndpoint.Query(id, QueryTimeout) is DeviceStats s)
            {
                result.Add(s);
            }
            else if (required)
            {
                throw new ArgumentException($"device {id}: no daemon answers for its figures ({StatsEndpoint.PathFor(id)}): it does not exist, its daemon is gone, or it predates 'stats'");
            }
        }
        return result;
    }

    // A table: totals, or (with `before`) rates and the interval's latency.
    private static void Print(List<DeviceStats> now, Dictionary<uint, DeviceStats>? before, double seconds)
    {
        var rates = before is not null;
        Console.WriteLine(rates
            ? $"{"ID",-4} {"QUEUE",-5} {"READ/s",9} {"WRITE/s",9} {"FLUSH/s",8} {"RD MiB/s",9} {"WR MiB/s",9} {"ERR/s",6} {"INFL",5} {"RD p50/p99 us",15} {"WR p50/p99 us",15}"
            : $"{"ID",-4} {"QUEUE",-5} {"READS",11} {"WRITES",11} {"FLUSHES",9} {"DISCARDS",9} {"READ",10} {"WRITTEN",10} {"ERRORS",7} {"INFL",5} {"RD p50/p99 us",15} {"WR p50/p99 us",15}");
        foreach (var s in now.OrderBy(s => s.Device))
        {
            var prev = before?.GetValueOrDefault(s.Device);
            Row(s.Device, "all", s.Total, prev?.Total, rates, seconds);
            if (s.Queues.Count > 1)
            {
                foreach (var q in s.Queues)
                {
                    Row(s.Device, q.Queue.ToString(CultureInfo.InvariantCulture), q, prev?.Queues.FirstOrDefault(p => p.Queue == q.Queue), rates, seconds);
                }
            }
            var errors = s.Total.Errors;
            if (errors.Count > 0)
            {
                Console.WriteLine($"     errors: {string.Join(", ", errors.OrderBy(e => e.Key).Select(e => $"{Interop.Errno.Name(e.Key)} {e.Value}"))}");
            }
        }
        if (now.Count == 0)
        {
            Console.WriteLine("(no device whose daemon gives figures)");
        }
    }

    private static void Row(uint id, string queue, QueueStatsSnapshot s, QueueStatsSnapshot? prev, bool rates, double seconds)
    {
        if (!rates)
        {
            Console.WriteLine($"{id,-4} {queue,-5} {s.Requests[0],11} {s.Requests[1],11} {s.Requests[2],9} {s.Requests[3] + s.Requests[4],9} {Targets.ByteSize.Format(s.Bytes[0]),10} {Targets.ByteSize.Format(s.Bytes[1]),10} {s.TotalErrors,7} {s.InFlight,5} {Latency(s.Latency[0]),15} {Latency(s.Latency[1]),15}");
            return;
        }
        // Over the interval: what grew since the last look (a new daemon starts from 0: counted from there).
        long D(long a, long b) => a >= b ? a - b : a;
        double Rate(long a, long b) => D(a, b) / seconds;
        long[] Delta(long[] a, long[]? b) => b is null ? a : [.. a.Select((v, i) => D(v, b[i]))];
        var p = prev ?? QueueStatsSnapshot.Empty(s.Queue);
        var mib = 1024.0 * 1024.0;
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"{id,-4} {queue,-5} {Rate(s.Requests[0], p.Requests[0]),9:0} {Rate(s.Requests[1], p.Requests[1]),9:0} {Rate(s.Requests[2], p.Requests[2]),8:0} {Rate(s.Bytes[0], p.Bytes[0]) / mib,9:0.0} {Rate(s.Bytes[1], p.Bytes[1]) / mib,9:0.0} {Rate(s.TotalErrors, p.TotalErrors),6:0} {s.InFlight,5} {Latency(Delta(s.Latency[0], p.Latency[0])),15} {Latency(Delta(s.Latency[1], p.Latency[1])),15}"));
    }

    private static string Latency(long[] buckets)
    {
        var p50 = LatencyHistogram.Percentile(buckets, 0.5);
        return p50 == 0 ? "-" : string.Create(CultureInfo.InvariantCulture, $"{p50 / 1000.0:0}/{LatencyHistogram.Percentile(buckets, 0.99) / 1000.0:0}");
    }
}
