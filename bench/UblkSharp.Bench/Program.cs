using System.Diagnostics;
using System.Runtime.InteropServices;
using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Diagnosers;
using BenchmarkDotNet.Exporters;
using BenchmarkDotNet.Exporters.Json;
using BenchmarkDotNet.Jobs;
using BenchmarkDotNet.Loggers;
using BenchmarkDotNet.Running;
using BenchmarkDotNet.Toolchains.InProcess.Emit;
using UblkSharp.Interop;
using UblkSharp.Interop.IoUring;

namespace UblkSharp.Bench;

/// <summary>
/// Host benchmarks. `binding`: the io_uring binding's NOP batches and 4 KiB random reads from a
/// tmpfs file at a fixed queue depth; the same loops exist in C over liburing
/// (peers/liburing-bench.c), so the two can be compared as a ratio in one run. `micro`:
/// BenchmarkDotNet over the per-IO hot path (<see cref="HotPath"/>), with allocation columns.
/// usage: UblkSharp.Bench binding [--seconds N] [--file PATH]
///        UblkSharp.Bench micro [--quick] [--artifacts DIR]
/// </summary>
public static unsafe class Program
{
    public static int Main(string[] args)
    {
        if (args.Length > 0 && args[0] == "micro")
        {
            return Micro(args);
        }
        if (args.Length == 0 || args[0] != "binding")
        {
            Console.Error.WriteLine("usage: UblkSharp.Bench binding [--seconds N] [--file PATH]\n       UblkSharp.Bench micro [--quick] [--artifacts DIR]");
            return 2;
        }
        var seconds = 3.0;
        var path = "/dev/shm/ublksharp-bench.dat";
        for (var i = 1; i + 1 < args.Length; i += 2)
        {
            switch (args[i])
            {
                case "--seconds": seconds = double.Parse(args[i + 1], System.Globalization.CultureInfo.InvariantCulture); break;
                case "--file": path = args[i + 1]; break;
                default: Console.Error.WriteLine($"unknown option {args[i]}"); return 2;
            }
        }
        const long fileSize = 64L << 20;
        EnsureDataFile(path, fileSize);
        var fd = Libc.OpenOrThrow(path, Libc.O_RDONLY);
        try
        {
            // Longer than the C peer's 0.3 s: the JIT's tiering settles here, not in the measured loop.
            Nop(1.0);
            var nop = Nop(seconds);
            Read(fd, fileSize, 1.0);
            var read = Read(fd, fileSize, seconds);
            Console.WriteLine($"nop_batch32_ops_per_s {nop.Wall:F0}");
            Console.WriteLine($"nop_batch32_ops_per_cpu_s {nop.Cpu:F0}");
            Console.WriteLine($"read4k_qd32_ops_per_s {read.Wall:F0}");
            Console.WriteLine($"read4k_qd32_ops_per_cpu_s {read.Cpu:F0}");
        }
        finally
        {
            _ = Libc.close(fd);
        }
        return 0;
    }

    /// <summary>Creates (or tops up) a file of random bytes at least <paramref name="size"/> long.</summary>
    public static void EnsureDataFile(string path, long size)
    {
        using var fs = new FileStream(path, FileMode.OpenOrCreate);
        if (fs.Length < size)
        {
            var chunk = new byte[1 << 20];
            Random.Shared.NextBytes(chunk);
            for (var written = 0L; written < size; written += chunk.Length)
            {
                fs.Write(chunk);
            }
        }
    }

    private static int Micro(string[] args)
    {
        var quick = false;
        string? filter = null;
        var artifacts = Path.Combine(Path.GetTempPath(), "ublksharp-bench-micro");
        for (var i = 1; i < args.Length; i++)
        {
            switch (args[i])
            {
                case "--quick": quick = true; break;
                case "--artifacts" when i + 1 < args.Length: artifacts = args[++i]; break;
                case "--filter" when i + 1 < args.Length: filter = args[++i]; break;
                default: Console.Error.WriteLine($"unknown option {args[i]}"); return 2;
            }
        }
        // In-process: no per-benchmark project build (minutes on this machine), and the
        // MemoryDiagnoser works the same. A short job: the run is one section of bench/run.sh.
        var job = Job.ShortRun.WithToolchain(InProcessEmitToolchain.Instance).WithId("hotpath");
        job = quick ? job.WithWarmupCount(2).WithIterationCount(3) : job.WithWarmupCount(3).WithIterationCount(7);
        var config = ManualConfig.CreateEmpty()
            .AddJob(job)
            .AddDiagnoser(MemoryDiagnoser.Default)
            .AddColumnProvider(DefaultColumnProviders.Instance)
            .AddLogger(ConsoleLogger.Default)
            .AddExporter(MarkdownExporter.Console, JsonExporter.Full)
            .WithArtifactsPath(artifacts)
            .WithOptions(ConfigOptions.DisableLogFile);
        if (filter is not null)
        {
            config = config.AddFilter(new BenchmarkDotNet.Filters.GlobFilter([filter])); // e.g. '*LoopRead4k*'
        }
        var summary = BenchmarkRunner.Run<HotPath>(config);
        return summary.HasCriticalValidationErrors || summary.Reports.Any(r => !r.Success) ? 1 : 0;
    }

    /// <summary>
    /// Operations per wall-clock second and per second of process CPU time (io-wq workers
    /// included): the latter does not drop when other load on a shared host takes the CPU away.
    /// </summary>
    private readonly record struct Rate(double Wall, double Cpu)
    {
        public static Rate Of(long ops, Stopwatch wall, TimeSpan cpu0) => new(ops / wall.Elapsed.TotalSeconds, ops / (Environment.CpuUsage.TotalTime - cpu0).TotalSeconds);
    }

    private static Rate Nop(double seconds)
    {
        const int batch = 32;
        using var ring = Ring.Create(new RingOptions { Entries = 64, SingleIssuer = true, DeferTaskrun = true });
        long ops = 0;
        var cpu0 = Environment.CpuUsage.TotalTime;
        var sw = Stopwatch.StartNew();
        var limit = (long)(seconds * Stopwatch.Frequency);
        while (sw.ElapsedTicks < limit)
        {
            for (var k = 0; k < 1000; k++)
            {
                for (var i = 0; i < batch; i++)
                {
                    ring.GetSqe().PrepareNop((ulong)i);
                }
                ring.SubmitAndWait(batch);
                // As the C peer does: count the batch in place, advance the CQ head once.
                var n = ring.PeekCompletions();
                ring.AdvanceCompletions(n);
                ops += n;
            }
        }
        return Rate.Of(ops, sw, cpu0);
    }

    private static Rate Read(int fd, long fileSize, double seconds)
    {
        const int depth = 32, block = 4096;
        using var ring = Ring.Create(new RingOptions { Entries = depth * 2, SingleIssuer = true, DeferTaskrun = true });
        var buf = (byte*)NativeMemory.AlignedAlloc(depth * block, 4096);
        var blocks = (ulong)(fileSize / block);
        var rng = 0x9e3779b97f4a7c15ul;
        long ops = 0;
        try
        {
            for (var i = 0; i < depth; i++)
            {
                ring.GetSqe().PrepareRead(fd, buf + (i * block), block, NextOffset(ref rng, blocks), (ulong)i);
            }
            var cpu0 = Environment.CpuUsage.TotalTime;
            var sw = Stopwatch.StartNew();
            var limit = (long)(seconds * Stopwatch.Frequency);
            while (sw.ElapsedTicks < limit)
            {
                ring.SubmitAndWait(1);
                var n = ring.PeekCompletions();
                for (var i = 0u; i < n; i++)
                {
                    ref readonly var cqe = ref ring.CompletionAt(i);
                    if (cqe.res != block)
                    {
                        throw new IOException($"read failed: {cqe.res}");
                    }
                    var slot = (int)cqe.user_data;
                    ring.GetSqe().PrepareRead(fd, buf + (slot * block), block, NextOffset(ref rng, blocks), cqe.user_data);
                }
                ring.AdvanceCompletions(n);
                ops += n;
            }
            var rate = Rate.Of(ops, sw, cpu0);
            // Drain what is still in flight before the buffers go.
            for (var left = depth; left > 0;)
            {
                ring.SubmitAndWait(1);
                while (ring.TryGetCompletion(out _))
                {
                    left--;
                }
            }
            return rate;
        }
        finally
        {
            NativeMemory.AlignedFree(buf);
        }
    }

    private static ulong NextOffset(ref ulong state, ulong blocks)
    {
        // xorshift64: the same generator as the C peer, so both read the same offsets.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        return state % blocks * 4096;
    }
}
