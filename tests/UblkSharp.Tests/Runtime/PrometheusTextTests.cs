using System.Diagnostics;
using UblkSharp.Runtime.Metrics;
using UblkSharp.Ublk;

namespace UblkSharp.Tests.Runtime;

/// <summary>
/// The Prometheus text a daemon serves on `--metrics`, read by the Prometheus project's own Python
/// parser (python3-prometheus-client), which rejects anything off-format: each family, its type and
/// the values it carries.
/// </summary>
public class PrometheusTextTests
{
    [Fact]
    public async Task TheTextParsesStrictlyAndCarriesTheFigures()
    {
        var q0 = new QueueStats();
        var q1 = new QueueStats();
        var t0 = Stopwatch.GetTimestamp();
        for (var i = 0; i < 3; i++)
        {
            q0.Completed(IoOp.Read, 4096, t0);
        }
        q1.Completed(IoOp.Write, -28, t0); // ENOSPC
        var text = PrometheusText.Write([new DeviceStats(2, 0, [q0.Snapshot(0), q1.Snapshot(1, inFlight: 1)])]);
        var samples = await ParseStrictly(text);
        Assert.Contains("counter ublksharp_requests_total device=2,op=read,queue=0 3.0", samples);
        Assert.Contains("counter ublksharp_bytes_total device=2,op=read,queue=0 12288.0", samples);
        Assert.Contains("counter ublksharp_errors_total device=2,errno=ENOSPC,queue=1 1.0", samples);
        Assert.Contains("gauge ublksharp_inflight_requests device=2,queue=1 1.0", samples);
        Assert.Contains("histogram ublksharp_request_duration_seconds_count device=2,op=read 3.0", samples);
        Assert.Contains("histogram ublksharp_request_duration_seconds_bucket device=2,le=+Inf,op=write 1.0", samples);
        // Buckets are cumulative: never fewer below a larger bound.
        var reads = samples.Where(s => s.StartsWith("histogram ublksharp_request_duration_seconds_bucket device=2,le=", StringComparison.Ordinal) && s.Contains(",op=read ", StringComparison.Ordinal))
            .Select(s => double.Parse(s[(s.LastIndexOf(' ') + 1)..], System.Globalization.CultureInfo.InvariantCulture)).ToList();
        Assert.Equal(LatencyHistogram.BucketCount, reads.Count);
        Assert.Equal(reads.Order(), reads);
        Assert.Equal(3.0, reads[^1]);
    }

    /// <summary>
    /// The text through prometheus_client's parser (which refuses anything off-format), one line
    /// per sample: "TYPE NAME LABEL=VALUE,... VALUE", labels sorted.
    /// </summary>
    internal static async Task<string[]> ParseStrictly(string text)
    {
        const string script = """
            import sys
            from prometheus_client.parser import text_string_to_metric_families
            for f in text_string_to_metric_families(sys.stdin.read()):
                for s in f.samples:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                    print(f"{f.type} {s.name} {labels} {s.value}")
            """;
        // Debian's python, which has python3-prometheus-client (a pyenv python3 on PATH would not).
        var psi = new ProcessStartInfo("/usr/bin/python3", ["-c", script]) { RedirectStandardInput = true, RedirectStandardOutput = true, RedirectStandardError = true };
        using var p = Process.Start(psi)!;
        await p.StandardInput.WriteAsync(text);
        p.StandardInput.Close();
        var stdout = p.StandardOutput.ReadToEndAsync(TestContext.Current.CancellationToken);
        var stderr = p.StandardError.ReadToEndAsync(TestContext.Current.CancellationToken);
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(TestContext.Current.CancellationToken);
        cts.CancelAfter(TimeSpan.FromSeconds(60));
        await p.WaitForExitAsync(cts.Token);
        Assert.True(p.ExitCode == 0, $"the parser refused the text ({await stderr}):\n{text}");
        return (await stdout).Split('\n', StringSplitOptions.RemoveEmptyEntries);
    }
}
