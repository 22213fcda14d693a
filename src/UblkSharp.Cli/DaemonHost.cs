using System.Runtime.InteropServices;
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
    public static int Serve(string kind, Dictionary<string, string> recipe, DeviceOptions options, bool autoclear, uint? recoverId, string? readyFile)
    {
        try
        {
            // The handlers come first: a signal while the device starts must not end the process
            // before the device is gone again. It is seen once the start returns, and the device deleted.
            using var stop = new ManualResetEventSlim();
            using var term = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => { c.Cancel = true; stop.Set(); });
            using var intr = PosixSignalRegistration.Create(PosixSignal.SIGINT, c => { c.Cancel = true; stop.Set(); });
            using var target = TargetFactory.Create(kind, recipe);
            using var device = recoverId is uint rid ? UblkDevice.Recover(rid, target, options) : UblkDevice.Create(target, options);
            (DeviceRecord.Of(device, kind, recipe, target.Size) with { Autoclear = autoclear, SupervisorPid = Supervisor.ParentSupervisorPid }).Save();
            Console.WriteLine(device.BlockPath);
            DaemonLauncher.ReportReady(readyFile, device.Id, device.BlockPath);
            if (autoclear)
            {
                var watch = new Autoclear(device.BlockPath);
                if (watch.WaitUntilReleased(() => stop.IsSet || device.WaitForStop(TimeSpan.Zero)))
                {
                    var left = watch.Retire(TimeSpan.FromSeconds(30));
                    Console.Error.WriteLine($"ublksharp: device {device.Id} is no longer mounted; deleting it{(left > 0 ? $" ({left} openers still hold it)" : "")}");
                }
            }
            else
            {
                // Serve until a signal, or until someone else stops the device (ublksharp del).
                while (!stop.Wait(250) && !device.WaitForStop(TimeSpan.Zero))
                {
                }
            }
            var id = device.Id;
            device.Dispose();
            DeviceRecord.Remove(id);
            Console.Error.WriteLine($"ublksharp: device {id} stopped; {device.Completed} requests served, {device.Errors} failed");
            return 0;
        }
        catch (Exception e) when (CliErrors.IsExpected(e))
        {
            DaemonLauncher.ReportFailure(readyFile, CliErrors.Describe(e));
            throw;
        }
    }
}
