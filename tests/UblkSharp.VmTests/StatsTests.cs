using System.Text.Json;

namespace UblkSharp.VmTests;

/// <summary>
/// `ublksharp stats` against a daemon under fio: the requests it counts are the ones the kernel
/// counts for the block device (/sys/block/ublkbN/stat), the bytes are the requests' bytes, the
/// latency percentiles are there, and `--watch` prints rates. A failed request is counted by errno.
/// </summary>
[Trait("boot", "shared")]
public class StatsTests
{
    private const string Image = "/tmp/ublksharp-stats.img";

    [Fact]
    public async Task StatsCountWhatTheKernelCountsAndWatchPrintsRates()
    {
        VmEnvironment.RequireDriver();
        // The guest's init leaves its own loopback down (the guest has no network at all).
        VmEnvironment.ShOk("ip link set lo up");
        Lifecycle.CreateImage(Image, 64 << 20);
        try
        {
            var dev = CliDevices.Add($"-t loop -f {Image} -q 2 -d 32 --metrics tcp://127.0.0.1:9560");
            var id = CliDevices.IdOf(dev);
            var fio = Task.Run(() => VmEnvironment.Sh($"fio --name=s --filename={dev} --direct=1 --ioengine=libaio --rw=randrw --bs=4k --iodepth=16 --numjobs=2 --time_based --runtime=6 --size=32M --group_reporting > /dev/null", TimeSpan.FromMinutes(2)), TestContext.Current.CancellationToken);
            await Task.Delay(1500, TestContext.Current.CancellationToken);
            var (code, watch) = VmEnvironment.RunCli($"stats -n {id} --watch 1 --count 2", TimeSpan.FromMinutes(1));
            Assert.True(code == 0, $"stats --watch exited {code}: {watch}");
            VmEnvironment.Figure($"STATS --watch under fio randrw on {VmEnvironment.KernelRelease}:\n{watch.TrimEnd()}");
            var fioResult = await fio;
            Assert.True(fioResult.ExitCode == 0, $"fio failed: {fioResult.Output}");
            var rows = watch.Split('\n').Where(l => l.StartsWith($"{id} ", StringComparison.Ordinal)).ToList();
            Assert.True(rows.Count >= 2, $"no rows for device {id}:\n{watch}");
            var readRate = double.Parse(rows[0].Split(' ', StringSplitOptions.RemoveEmptyEntries)[2], System.Globalization.CultureInfo.InvariantCulture);
            Assert.True(readRate > 0, $"no reads per second while fio ran:\n{watch}");

            // Once idle, the daemon's counts are the kernel's, request for request.
            var (reads, writes) = Lifecycle.IoCounts(dev);
            var (jcode, json) = VmEnvironment.RunCli($"stats -n {id} --json", TimeSpan.FromMinutes(1));
            Assert.True(jcode == 0, $"stats --json exited {jcode}: {json}");
            using var doc = JsonDocument.Parse(json.Trim().Split('\n')[^1]);
            var total = doc.RootElement.GetProperty("total");
            var ops = total.GetProperty("ops");
            Assert.Equal(reads, ops.GetProperty("read").GetProperty("requests").GetInt64());
            Assert.Equal(writes, ops.GetProperty("write").GetProperty("requests").GetInt64());
            // And byte for byte: the kernel's sectors read and written.
            var stat = File.ReadAllText($"/sys/block/ublkb{id}/stat").Split(' ', StringSplitOptions.RemoveEmptyEntries);
            Assert.Equal(long.Parse(stat[2], System.Globalization.CultureInfo.InvariantCulture) * 512, ops.GetProperty("read").GetProperty("bytes").GetInt64());
            Assert.Equal(long.Parse(stat[6], System.Globalization.CultureInfo.InvariantCulture) * 512, ops.GetProperty("write").GetProperty("bytes").GetInt64());
            Assert.Equal(0, total.GetProperty("inFlight").GetInt32());
            Assert.Equal(2, doc.RootElement.GetProperty("queues").GetArrayLength());
            var p99 = ops.GetProperty("read").GetProperty("latencyUs").GetProperty("p99").GetDouble();
            var p50 = ops.GetProperty("read").GetProperty("latencyUs").GetProperty("p50").GetDouble();
            Assert.True(p50 > 0 && p99 >= p50, $"read latency p50 {p50} us, p99 {p99} us");
            Assert.Empty(total.GetProperty("errors").EnumerateObject());
            VmEnvironment.Figure($"STATS on {VmEnvironment.KernelRelease}: {reads} reads and {writes} writes, as the kernel counts them; read p50 {p50} us, p99 {p99} us");

            // The same figures for Prometheus, as a scrape gets them, read by its own parser.
            var scrape = VmEnvironment.ShOk("curl -sS --max-time 10 http://127.0.0.1:9560/metrics");
            File.WriteAllText("/tmp/ublksharp-scrape.txt", scrape);
            File.WriteAllText("/tmp/ublksharp-scrape.py", """
                import sys
                from prometheus_client.parser import text_string_to_metric_families as families
                print(sum(s.value for m in families(sys.stdin.read()) for s in m.samples
                          if s.name == "ublksharp_requests_total" and s.labels["op"] == "read"))
                """);
            var scrapedReads = VmEnvironment.ShOk("/usr/bin/python3 /tmp/ublksharp-scrape.py < /tmp/ublksharp-scrape.txt").Trim();
            Assert.Equal(reads, (long)double.Parse(scrapedReads, System.Globalization.CultureInfo.InvariantCulture));
            Assert.Contains("ublksharp_request_duration_seconds_bucket{device=", scrape, StringComparison.Ordinal);
            Assert.Contains("404", VmEnvironment.ShOk("curl -s -o /dev/null -w '%{http_code}' --max-time 10 http://127.0.0.1:9560/"), StringComparison.Ordinal);
            VmEnvironment.Figure($"SCRAPE on {VmEnvironment.KernelRelease} (first lines):\n{string.Join('\n', scrape.Split('\n').Take(12))}");

            // A table without --watch; and a device no daemon serves is refused clearly.
            var (tcode, table) = VmEnvironment.RunCli($"stats", TimeSpan.FromMinutes(1));
            Assert.True(tcode == 0 && table.Contains($"{id}    all", StringComparison.Ordinal), $"stats exited {tcode}:\n{table}");
            Lifecycle.AssertRefused("stats -n 99", "no daemon answers");
            CliDevices.Del(id);
            Assert.False(File.Exists($"/run/ublksharp/{id}.stats"), "the stats socket outlived its device");
            Assert.NotEqual(0, VmEnvironment.Sh("curl -s --max-time 5 http://127.0.0.1:9560/metrics").ExitCode);
        }
        finally
        {
            Lifecycle.CleanUp();
            File.Delete(Image);
        }
    }
}
