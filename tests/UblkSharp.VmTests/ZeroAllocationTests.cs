using System.Reflection;
using System.Runtime.CompilerServices;
using UblkSharp.Nbd;
using UblkSharp.Nbd.Protocol;
using UblkSharp.Runtime;
using UblkSharp.Targets;

namespace UblkSharp.VmTests;

/// <summary>
/// The hot path allocates nothing: after its warm-up, a queue thread serving real IO (fio, 4 KiB
/// random read/write) allocates 0 bytes; and nothing in the runtime is async, so nothing is awaited
/// on a queue thread.
/// </summary>
[Trait("boot", "shared")]
public class ZeroAllocationTests
{
    private const string Image = "/tmp/ublksharp-zero-alloc.img";

    [Theory]
    [InlineData("mem")]
    [InlineData("loop")]
    [InlineData("nbd")]
    public void SteadyStateServesWithoutAllocating(string kind) => Measure(kind);

    /// <summary>
    /// The loop target on the ring and the nbd target with zero copy (AUTO_BUF_REG) and batched IO
    /// where the kernel has them (7.3), the copy path where not (6.12).
    /// </summary>
    [Theory]
    [InlineData("loop-zc")]
    [InlineData("nbd-zc")]
    // SUPPORT_ZERO_COPY's explicit registration: two more commands per request, still nothing allocated.
    [InlineData("loop-explicit")]
    [Trait("kernel", "7.3")]
    public void ZeroCopySteadyStateServesWithoutAllocating(string kind) => Measure(kind);

    private static void Measure(string kind)
    {
        VmEnvironment.RequireDriver();
        using (var f = File.Create(Image))
        {
            f.SetLength(64 << 20);
        }
        try
        {
            Exception? fatal = null;
            // nbd: the ring backend in front of our own server over a unix socket, in this process
            // (only the queue threads' allocations are counted).
            using var remote = kind.StartsWith("nbd", StringComparison.Ordinal) ? new MemoryTarget(64 << 20) : null;
            var socket = $"/tmp/ublksharp-za-{Guid.NewGuid():N}"[..30] + ".sock";
            using var server = remote is null ? null : NbdServer.Start(NbdAddress.Unix(socket), new NbdExport("disk", remote));
            using BlockTarget target = kind switch
            {
                "mem" => new MemoryTarget(64 << 20),
                "nbd" or "nbd-zc" => new NbdTarget(NbdUri.Unix(socket, "disk")),
                "loop-zc" or "loop-explicit" => new LoopTarget(Image, io: LoopIo.Ring),
                _ => new LoopTarget(Image),
            };
            var explicitZeroCopy = kind == "loop-explicit";
            var options = new DeviceOptions { Queues = 2, Depth = 64, ZeroCopy = explicitZeroCopy ? ZeroCopyMode.Explicit : ZeroCopyMode.Auto };
            if (explicitZeroCopy && !ControlFeatureTests.Offers(Ublk.UblkFeatures.SupportZeroCopy))
            {
                // 6.12: refused, with the kernel it needs.
                Assert.Contains("SUPPORT_ZERO_COPY", Assert.Throws<NotSupportedException>(() => UblkDevice.Create(target, options)).Message, StringComparison.Ordinal);
                return;
            }
            using var device = UblkDevice.Create(target, options, e => fatal = e);
            // 2 jobs × 12,288 IOs of 4 KiB, one job per CPU and so per queue.
            var r = Fio.Run(device.BlockPath, TimeSpan.FromMinutes(4), "--rw=randrw", "--bs=4k", "--size=32M", "--offset_increment=32M", "--io_size=48M");
            VmEnvironment.Log($"{kind}: {r.Summary}");
            Assert.True(r.ExitCode == 0 && r.Error == 0, $"fio failed: {r}");
            Assert.True(r.TotalIos >= 20_000, $"only {r.TotalIos} IOs: {r}");
            Assert.Null(fatal);
            Assert.Equal(0, device.Errors);

            var queues = Queues(device);
            var perQueue = string.Join(", ", queues.Select(q => $"queue {q.QueueId}: {q.Completed} requests, {q.SteadyStateAllocatedBytes} bytes"));
            VmEnvironment.Log($"{kind}: {perQueue}");
            Assert.True(device.Completed > UblkQueue.WarmUpRequests, $"{device.Completed} requests: the warm-up never ended");
            // Each queue got past its warm-up, so each measured its steady state.
            Assert.All(queues, q => Assert.True(q.Completed > UblkQueue.WarmUpRequests + 1000, $"too few requests to measure: {perQueue}"));
            Assert.True(device.SteadyStateAllocatedBytes == 0, $"queue threads allocated in steady state: {perQueue}");
            if (kind.EndsWith("-zc", StringComparison.Ordinal) || explicitZeroCopy)
            {
                using var control = Ublk.ControlDevice.Open();
                var offered = (control.GetFeatures() & (explicitZeroCopy ? Ublk.UblkFeatures.SupportZeroCopy : Ublk.UblkFeatures.AutoBufReg)) != 0;
                var zeroCopy = queues.Sum(q => q.ZeroCopyRequests);
                VmEnvironment.Log($"{kind}: {zeroCopy} requests zero copy (AUTO_BUF_REG offered: {offered})");
                Assert.True(offered ? zeroCopy >= r.TotalIos : zeroCopy == 0, $"{zeroCopy} requests zero copy of {r.TotalIos}, AUTO_BUF_REG offered: {offered}");
            }
        }
        finally
        {
            File.Delete(Image);
        }
    }

    private static IReadOnlyList<UblkQueue> Queues(UblkDevice device)
    {
        Assert.Equal(2, device.Queues.Count);
        return device.Queues;
    }

    [Fact]
    public void NothingInTheRuntimeIsAsync()
    {
        // The runtime namespace, and every target and backend type, whose methods run on queue threads.
        var types = typeof(UblkDevice).Assembly.GetTypes()
            .Where(t => t.Namespace == typeof(UblkDevice).Namespace || typeof(BlockTarget).IsAssignableFrom(t) || typeof(UringBackend).IsAssignableFrom(t)
                || t == typeof(FaultInjector))
            .ToArray();
        Assert.Contains(typeof(UblkQueue), types);
        Assert.Contains(typeof(LoopTarget), types);
        const BindingFlags all = BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.Instance | BindingFlags.Static | BindingFlags.DeclaredOnly;
        var methods = types.SelectMany(t => t.GetMethods(all).Cast<MethodBase>().Concat(t.GetConstructors(all))).ToArray();
        Assert.True(methods.Length > 50, $"only {methods.Length} methods found");
        var async = methods
            .Where(m => m.GetCustomAttribute<AsyncStateMachineAttribute>() is not null || m.GetCustomAttribute<AsyncIteratorStateMachineAttribute>() is not null
                || (m is MethodInfo mi && (typeof(Task).IsAssignableFrom(mi.ReturnType) || mi.ReturnType.Name.StartsWith("ValueTask", StringComparison.Ordinal))))
            .Select(m => $"{m.DeclaringType}.{m.Name}");
        Assert.Empty(async);
        Assert.DoesNotContain(types, t => typeof(IAsyncStateMachine).IsAssignableFrom(t));
    }
}
