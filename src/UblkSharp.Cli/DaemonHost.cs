using System.Runtime.InteropServices;
using UblkSharp.Cli.Logging;
using UblkSharp.Runtime;
using UblkSharp.Targets;

namespace UblkSharp.Cli;

/// <summary>
/// The daemon side of `add --foreground` and `recover --foreground`: builds the target, creates
/// (or recovers) the device, records it, reports readiness, then serves until SIGTERM/SIGINT,
/// until someone stops the device, or (autoclear) until its last mount is gone.
/// </summary>
internal static class DaemonHost
{
    // handedOver: for a recovery, the last daemon handed the device over (its record says so).
    // metrics: where to serve the figures for Prometheus (checked by the command that took it).
    public static int Serve(string kind, Dictionary<string, string> recipe, DeviceOptions options, bool autoclear, uint? recoverId, string? readyFile, TakeoverLock? takeover = null, bool handedOver = false, string? metrics = null)
    {
        try
        {
            // A daemon must hold nothing on a file system that may live on its own device: a cwd
            // there would pin that mount (umount says busy), and a daemon that must write back to
            // its own device to exit can never exit, so its device can never be recovered. The
            // recipe's paths are absolute (TargetOptions), so / costs nothing.
            Directory.SetCurrentDirectory("/");
            // The handlers come first: a signal while the device starts must not end the process
            // before the device is gone again. It is seen once the start returns, and the device deleted.
            using var stop = new ManualResetEventSlim();
            using var term = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => { c.Cancel = true; stop.Set(); });
            using var intr = PosixSignalRegistration.Create(PosixSignal.SIGINT, c => { c.Cancel = true; stop.Set(); });
            using var target = TargetFactory.Create(kind, recipe, CliLog.Factory);
            // Whoever built the options, the device logs where the daemon does.
            options = options with { LoggerFactory = CliLog.Factory };
            using var device = recoverId is uint rid ? UblkDevice.Recover(rid, target, options, takeover: takeover, handedOver: handedOver) : UblkDevice.Create(target, options);
            takeover?.Dispose(); // the takeover is over once the device is live again
            // The files' identities are taken with the target open: a recovery checks that its paths still name them.
            // recover's takeover option is for this start only: a later recovery decides its own.
            var recorded = recipe.ContainsKey(TargetFactory.TakeoverKey) ? recipe.Where(kv => kv.Key != TargetFactory.TakeoverKey).ToDictionary() : recipe;
            var record = DeviceRecord.Of(device, kind, recorded, target.Size) with
            {
                Autoclear = autoclear,
                SupervisorPid = Supervisor.ParentSupervisorPid,
                Files = FileIdentity.OfRecipe(recorded),
                Metrics = metrics,
            };
            record.Save();
            void Resized(long size)
            {
                // The record (and so `list`, and a recovery's target) has the new size.
                var r = new Dictionary<string, string>(record.Recipe);
                if (r.ContainsKey("size"))
                {
                    r["size"] = size.ToString(System.Globalization.CultureInfo.InvariantCulture);
                }
                record = record with { Size = size, Recipe = r };
                record.Save();
            }
            // An rbd image resized elsewhere (`rbd resize`): the device follows where the kernel can.
            long rbdSize = 0;
            if (target is RbdTarget rbd && device.CanUpdateSize)
            {
                rbd.FollowsResizes = true;
                rbd.Resized += (_, size) => Interlocked.Exchange(ref rbdSize, size);
            }
            // Requests that must run on this thread (the control ring's), between waits.
            var letGo = false;
            void Service()
            {
                ResizeRequests.Serve(device, Resized);
                if (HandOverRequests.Take(device.Id) is string token)
                {
                    // The record says the target's state is on disk before the next daemon reads it.
                    letGo = HandOver(device, target, token, () => (record with { Released = true }).Save());
                    if (letGo)
                    {
                        return;
                    }
                }
                var follow = Interlocked.Exchange(ref rbdSize, 0) & ~511L;
                if (follow > 0 && follow != device.KernelSize)
                {
                    try
                    {
                        device.Resize(follow, allowShrink: true, growBacking: false);
                        Resized(device.KernelSize);
                        CliLog.Information($"device {device.Id} follows its rbd image: now {follow} bytes");
                    }
                    catch (Exception e) when (CliErrors.IsExpected(e))
                    {
                        CliLog.Warning($"device {device.Id}: following the rbd image's resize failed: {CliErrors.Describe(e)}");
                    }
                }
            }
            using var stats = StatsEndpoint.Start(device);
            using var prometheus = StartMetrics(metrics, device);
            Console.WriteLine(device.BlockPath);
            DaemonLauncher.ReportReady(readyFile, device.Id, device.BlockPath);
            if (autoclear)
            {
                var watch = new Autoclear(device.BlockPath);
                if (watch.WaitUntilReleased(() =>
                {
                    Service();
                    return letGo || stop.IsSet || device.WaitForStop(TimeSpan.Zero);
                }) && !letGo)
                {
                    var left = watch.Retire(TimeSpan.FromSeconds(30));
                    CliLog.Information($"device {device.Id} is no longer mounted; deleting it{(left > 0 ? $" ({left} openers still hold it)" : "")}");
                }
            }
            else
            {
                // Serve until a signal, or until someone else stops the device (ublksharp del).
                while (!letGo && !stop.Wait(250) && !device.WaitForStop(TimeSpan.Zero))
                {
                    Service();
                }
            }
            if (letGo)
            {
                // The next daemon serves the device now, with its record: both stay. Without
                // QUIESCE_DEV this process's exit is what hands the waiting requests over: at once.
                Console.Out.Flush();
                Console.Error.Flush();
                Interop.Processes.ExitNow(0);
            }
            var id = device.Id;
            SystemdNotify.Stopping();
            device.Dispose();
            DeviceRecord.Remove(id);
            CliLog.Information($"device {id} stopped; {device.Completed} requests served, {device.Errors} failed");
            return 0;
        }
        catch (Exception e) when (CliErrors.IsExpected(e))
        {
            DaemonLauncher.ReportFailure(readyFile, CliErrors.Describe(e));
            throw;
        }
    }

    // The figures for Prometheus, if asked for; a failure to listen is said and the device served anyway.
    private static MetricsEndpoint? StartMetrics(string? metrics, UblkDevice device)
    {
        if (metrics is null)
        {
            return null;
        }
        try
        {
            return MetricsEndpoint.Start(MetricsEndpoint.Parse(metrics, insecure: true), () => Runtime.Metrics.PrometheusText.Write([device.Stats()]));
        }
        catch (Exception e) when (e is System.Net.Sockets.SocketException or IOException or ArgumentException)
        {
            CliLog.Warning($"device {device.Id}: no metrics at {metrics}: {e.Message}");
            return null;
        }
    }

    // `ublksharp upgrade`'s request: true once the device is handed over (this daemon then exits);
    // false if it was refused and this daemon still serves. A failure half way ends the daemon: the
    // device is left quiesced, with its IO held, for the new daemon or `recover`.
    private static bool HandOver(UblkDevice device, BlockTarget target, string token, Action markReleased)
    {
        var id = device.Id;
        var clock = System.Diagnostics.Stopwatch.StartNew();
        try
        {
            device.HandOver(TimeSpan.FromSeconds(30));
            // The next daemon opens the target's files after this answer: what this one still
            // holds in memory (a cow overlay's bitmap) must be on disk first.
            target.Dispose();
            markReleased();
        }
        catch (RecoveryRefusedException e)
        {
            HandOverRequests.Answer(id, token, $"error {e.Message}");
            CliLog.Warning($"device {id}: hand-over refused: {e.Message}");
            return false;
        }
        catch (Exception e) when (CliErrors.IsExpected(e))
        {
            HandOverRequests.Answer(id, token, $"error {CliErrors.Describe(e)}");
            throw;
        }
        HandOverRequests.Answer(id, token, $"ok {device.LeftForNextDaemon}");
        CliLog.Information($"device {id} handed over in {clock.Elapsed.TotalMilliseconds:0} ms ({device.LeftForNextDaemon} requests left to the next daemon); {device.Completed} requests served, {device.Errors} failed");
        return true;
    }
}
