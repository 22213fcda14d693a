using System.Globalization;
using System.Text.Json;

namespace UblkSharp.VmTests;

/// <summary>What one fio run reported (its jobs summed by --group_reporting).</summary>
internal sealed record FioResult(int ExitCode, string Stderr, int Error, long ReadIos, long WriteIos, long ReadBytes, long WriteBytes,
    double ReadIops, double WriteIops)
{
    public long TotalIos => ReadIos + WriteIos;

    public string Summary => string.Create(CultureInfo.InvariantCulture,
        $"read {ReadIos} IOs ({ReadIops:0} IOPS, {ReadBytes >> 20} MiB), write {WriteIos} IOs ({WriteIops:0} IOPS, {WriteBytes >> 20} MiB), error {Error}, exit {ExitCode}");

    public override string ToString() => $"{Summary}\n{Stderr}";
}

/// <summary>
/// fio against a block device: O_DIRECT, io_uring, 2 jobs pinned one per CPU (so with a queue per
/// CPU, each queue gets IO), results as JSON.
/// </summary>
internal static class Fio
{
    /// <summary>
    /// The crc32c write-then-verify job: each of 2 jobs writes its own half of the first
    /// 2 × <paramref name="sizePerJob"/> bytes with random 4 to 128 KiB blocks at depth 32, then reads it all back and checks it.
    /// </summary>
    public static FioResult Verify(string device, string sizePerJob, TimeSpan timeout) => Run(device, timeout,
        "--rw=randwrite", "--bsrange=4k-128k", "--verify=crc32c", "--do_verify=1", "--verify_state_save=0",
        $"--size={sizePerJob}", $"--offset_increment={sizePerJob}");

    /// <summary>Runs fio on <paramref name="device"/> with the common options and <paramref name="options"/>.</summary>
    public static FioResult Run(string device, TimeSpan timeout, params string[] options)
    {
        var json = $"/tmp/ublksharp-fio-{Guid.NewGuid():N}.json";
        try
        {
            string[] args =
            [
                "--name=ublksharp", $"--filename={device}", "--direct=1", "--ioengine=io_uring", "--iodepth=32",
                "--numjobs=2", $"--cpus_allowed=0-{Environment.ProcessorCount - 1}", "--cpus_allowed_policy=split",
                "--group_reporting", "--output-format=json", $"--output={json}",
                .. options,
            ];
            var (code, stdout, stderr) = VmEnvironment.Exec("fio", args, timeout);
            var text = File.Exists(json) ? File.ReadAllText(json) : "";
            var start = text.IndexOf('{', StringComparison.Ordinal);
            Assert.True(start >= 0, $"fio {string.Join(' ', args)} exited {code} and wrote no JSON:\n{stdout}{stderr}{text}");
            using var doc = JsonDocument.Parse(text[start..]);
            var job = doc.RootElement.GetProperty("jobs")[0];
            var read = job.GetProperty("read");
            var write = job.GetProperty("write");
            var result = new FioResult(code, stdout + stderr + text[..start], job.GetProperty("error").GetInt32(),
                read.GetProperty("total_ios").GetInt64(), write.GetProperty("total_ios").GetInt64(),
                read.GetProperty("io_bytes").GetInt64(), write.GetProperty("io_bytes").GetInt64(),
                read.GetProperty("iops").GetDouble(), write.GetProperty("iops").GetDouble());
            VmEnvironment.Log($"fio {string.Join(' ', options)}: {result.Summary}");
            return result;
        }
        finally
        {
            File.Delete(json);
        }
    }

    /// <summary>A clean verify run: exit 0, no error, no verify complaint, and every written byte read back and checked.</summary>
    public static void AssertVerified(FioResult r)
    {
        Assert.True(r.ExitCode == 0 && r.Error == 0, $"fio failed: {r}");
        Assert.DoesNotContain("verify", r.Stderr, StringComparison.OrdinalIgnoreCase);
        Assert.True(r.WriteBytes > 0 && r.ReadBytes == r.WriteBytes, $"fio verified {r.ReadBytes} of {r.WriteBytes} bytes written: {r}");
    }
}
